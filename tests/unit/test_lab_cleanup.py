"""Lab helpers that must never touch what is not the lab's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.lab.errors import LabNotFound
from shoal.lab.lab import Lab, _remove_lab_files
from shoal.lab.procs import pids_mentioning_arg


def test_remove_only_lab_files(tmp_path: Path) -> None:
    for f in ("lab.json", "cluster.toml", "cluster.secret", "lun0.img"):
        (tmp_path / f).write_text("x")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "node1.log").write_text("x")
    (tmp_path / "precious.txt").write_text("keep me")
    assert not _remove_lab_files(tmp_path)  # not empty: the directory stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    (tmp_path / "precious.txt").unlink()
    assert _remove_lab_files(tmp_path) and not tmp_path.exists()


def test_process_match_is_whole_argument_only(tmp_path: Path) -> None:
    target = str(tmp_path / "cluster.toml")
    exact = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", target])
    shell = subprocess.Popen(["sh", "-c", f"sleep 30 # {target}"])
    try:
        found = pids_mentioning_arg(target)
        assert exact.pid in found and shell.pid not in found
    finally:
        exact.kill()
        shell.kill()
        exact.wait()
        shell.wait()


def test_commands_on_missing_lab_say_so(tmp_path: Path) -> None:
    with pytest.raises(LabNotFound, match="shoal lab up"):
        Lab(tmp_path / "none").status()
    p = subprocess.run([sys.executable, "-m", "shoal", "lab", "kill", "node1", "--dir", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "no lab in" in p.stderr and "Traceback" not in p.stderr
    assert Lab(tmp_path / "none").down("zz-not-a-lab") == []
