"""The lab's storage target: a formatted LUN served by ``shoal nbd serve``, waited for
before any agent starts, and a clear sentence naming its log when it does not come up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shoal.lab import lab as lab_module
from shoal.lab import procs
from shoal.lab.errors import LabError
from shoal.lab.lab import Lab, LabState
from shoal.volume.device import Device
from shoal.volume.volume import read_superblock

NAME = f"tg{os.getpid() % 100000}"  # loopback addresses derive from the name: keep runs apart


def test_loopback_lab_serves_a_formatted_volume(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    try:
        st = lab.up(1, name=NAME, loopback=True, timing="fast", say=lambda s: None)
        target = lab.status()["storage_target"]
        assert target["running"] and target["url"] == st.target and target["url"].endswith(":10809/lun0")
        argv = Path(f"/proc/{target['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"nbd" in argv and b"serve" in argv and str(st.image).encode() in argv
        dev = Device(str(st.image), writable=False)
        try:
            sb, warnings = read_superblock(dev)
        finally:
            dev.close()
        assert sb.name == "vol1" and sb.unit_size == 1 << 20 and sb.volume_size == 4 << 30 and not warnings
        assert "[[volume]]" in Path(st.config).read_text()
    finally:
        lab.down(NAME)
    assert not (tmp_path / "lab").exists()


def _broken(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    def command(self: Lab, st: LabState, target_ip: str) -> list[str]:
        return [sys.executable, "-c", code, str(st.image)]  # the image as an argument: down finds it
    monkeypatch.setattr(Lab, "target_command", command)


def test_target_that_exits_is_one_sentence_naming_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(monkeypatch, "import sys; print('cannot open the LUN', file=sys.stderr); sys.exit(3)")
    lab = Lab(tmp_path / "lab")
    try:
        with pytest.raises(LabError) as err:
            lab.up(1, name=NAME, loopback=True, say=lambda s: None)
        text = str(err.value)
        assert "storage target" in text and "did not come up" in text and "its process" in text and "exited" in text
        assert str(tmp_path / "lab" / "logs" / "storage-target.log") in text
        assert "cannot open the LUN" in (tmp_path / "lab" / "logs" / "storage-target.log").read_text()
        assert lab.load().agents == {}  # no agent was started
    finally:
        lab.down(NAME)


def test_target_that_never_answers_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(lab_module, "TARGET_START_TIMEOUT_S", 1.0)
    lab = Lab(tmp_path / "lab")
    try:
        with pytest.raises(LabError, match=r"did not answer within 1 s.*storage-target\.log"):
            lab.up(1, name=NAME, loopback=True, say=lambda s: None)
        pid = lab.load().target_pid
        assert procs.alive(pid)
    finally:
        lab.down(NAME)
    assert not procs.alive(pid)
