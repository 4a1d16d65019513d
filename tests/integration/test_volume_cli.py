"""The offline commands as a user runs them: real files, a loop device, qemu-img."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.volume import Volume
from shoal.volume.device import Device
from shoal.volume.errors import VolumeInUse as VolumeInUseError
from shoal.volume.lease import CoordinatorLease, LeaseArea, LivenessSlot
from shoal.volume.volume import read_superblock
from tests.conftest import assert_no_traceback, require_root, require_tool, shoal

MiB = 1 << 20


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _qemu_map(path: str) -> list[tuple[int, int, bool]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", path],
                         capture_output=True, text=True, check=True).stdout
    runs: list[tuple[int, int, bool]] = []
    for e in json.loads(out):
        data = bool(e["data"])
        if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["start"], e["length"], data))
    return runs


def test_one_gib_round_trip_keeps_bytes_and_holes(tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-utils")
    vol = str(tmp_path / "vol.img")
    src = str(tmp_path / "src.raw")
    dst = str(tmp_path / "dst.raw")
    shoal("volume", "format", vol, "--size", "2G", "--name", "rt", check=True)
    rng = random.Random(7)
    units = set()
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        for _ in range(12):
            start = rng.randrange(0, 1024 - 8) * MiB
            length = rng.randrange(1, 8) * MiB
            f.seek(start)
            f.write(rng.randbytes(length))
            units.update(range(start // MiB, (start + length) // MiB))
    proc = shoal("file", "import", "--volume", vol, src, "/disk.raw", check=True)
    assert_no_traceback(proc)
    proc = shoal("file", "export", "--volume", vol, "/disk.raw", dst, check=True)
    assert _sha(src) == _sha(dst)
    stat = json.loads(shoal("file", "stat", "--volume", vol, "/disk.raw", "--json", check=True).stdout)
    assert stat["allocated"] == len(units) * MiB
    info = json.loads(shoal("volume", "info", vol, "--json", check=True).stdout)
    assert info["used_units"] == len(units)
    assert _qemu_map(src) == _qemu_map(dst)
    assert shoal("volume", "fsck", vol).returncode == 0


def test_format_refuses_a_target_holding_data(tmp_path: Path) -> None:
    require_tool("mkfs.ext4", "e2fsprogs")
    img = str(tmp_path / "ext4.img")
    subprocess.run(["truncate", "-s", "128M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    before = _sha(img)
    proc = shoal("volume", "format", img, "--size", "128M")
    assert proc.returncode != 0
    assert "ext2/3/4 filesystem" in proc.stderr and "--force" in proc.stderr
    assert_no_traceback(proc)
    assert _sha(img) == before
    shoal("volume", "format", img, "--force", "--size", "128M", check=True)
    again = shoal("volume", "format", img, "--size", "128M")
    assert again.returncode != 0 and "another shoal volume" in again.stderr


@pytest.mark.parametrize("args, words", [
    (["volume", "format", "/nonexistent-dir/x.img", "--size", "1G"], "cannot create"),
    (["volume", "format", "{tmp}/v.img", "--size", "lots"], "is not a size"),
    (["volume", "format", "{tmp}/v.img", "--size", "1M"], "at least 64"),
    (["volume", "format", "{tmp}/v.img", "--size", "1G", "--unit", "3K"], "power of two"),
    (["volume", "info", "{tmp}/missing.img"], "does not exist"),
    (["volume", "info", "/etc/hostname"], "not a shoal volume"),
    (["file", "ls", "--volume", "{vol}", "/missing"], "does not exist"),
    (["file", "import", "--volume", "{vol}", "/nonexistent", "/x"], "cannot read"),
    (["file", "rm", "--volume", "{vol}", "/"], "root directory"),
    (["file", "mkdir", "--volume", "{vol}", "relative"], "must start with /"),
])
def test_user_mistakes_get_a_sentence(tmp_path: Path, volume_path: str, args: list[str], words: str) -> None:
    argv = [a.format(tmp=tmp_path, vol=volume_path) for a in args]
    proc = shoal(*argv)
    assert proc.returncode != 0
    assert_no_traceback(proc)
    assert words in proc.stderr, proc.stderr


_HOLDER = """
import sys, time
from dataclasses import replace
from shoal.volume.device import Device
from shoal.volume.errors import VolumeInUse as VolumeInUseError
from shoal.volume.lease import CoordinatorLease, LeaseArea, LivenessSlot
from shoal.volume.volume import read_superblock
dev = Device(sys.argv[1])
sb, _ = read_superblock(dev)
area = LeaseArea(dev, sb)
slot = LivenessSlot(node_id=2, io_timeout_ms=500, generation=1, cluster="lab", host="host-b")
area.write_slot(slot)
area.write_lease(CoordinatorLease(owner=2, io_timeout_ms=500, epoch=7, owner_generation=1, cluster="lab", owner_host="host-b"))
print("held", flush=True)
while True:
    slot = replace(slot, counter=slot.counter + 1)
    area.write_slot(slot)
    time.sleep(0.2)
"""


def _state_outside_leases(path: str) -> str:
    with Device(path, writable=False) as dev:
        sb, _ = read_superblock(dev)
        h = hashlib.sha256()
        h.update(dev.pread(0, sb.lease_offset))
        h.update(dev.pread(sb.journal_offset, sb.data_offset - sb.journal_offset + 8 * MiB))
        h.update(dev.pread(sb.backup_offset, 4096))
        return h.hexdigest()


def test_offline_commands_refuse_a_volume_in_use(volume_path: str, tmp_path: Path) -> None:
    src = tmp_path / "small.raw"
    src.write_bytes(b"x" * 4096)
    with Volume.open(volume_path) as vol:
        vol.create("/keep", MiB).pwrite(0, b"keep")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, volume_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _state_outside_leases(volume_path)
        for argv in (["file", "ls", "--volume", volume_path],
                     ["file", "mkdir", "--volume", volume_path, "/d"],
                     ["file", "rm", "--volume", volume_path, "/keep"],
                     ["file", "import", "--volume", volume_path, str(src), "/new"],
                     ["file", "truncate", "--volume", volume_path, "/keep", "--size", "0"],
                     ["volume", "fsck", volume_path, "--repair"],
                     ["volume", "defrag", volume_path]):
            proc = shoal(*argv)
            assert proc.returncode != 0, argv
            assert_no_traceback(proc)
            assert "in use by cluster lab, coordinator node2" in proc.stderr, proc.stderr
        info = json.loads(shoal("volume", "info", volume_path, "--json", check=True).stdout)
        assert info["lease"]["state"] == "held" and info["lease"]["owner_id"] == 2
        assert _state_outside_leases(volume_path) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died: after the lease expires (8 x 0.5 s) the tools take over
    started = time.monotonic()
    shoal("file", "mkdir", "--volume", volume_path, "/after", check=True)
    assert time.monotonic() - started >= 2.0
    assert "after" in shoal("file", "ls", "--volume", volume_path, check=True).stdout


def test_loop_device_volume(tmp_path: Path) -> None:
    require_root("attach a loop device")
    require_tool("losetup", "util-linux")
    backing = str(tmp_path / "backing.img")
    subprocess.run(["truncate", "-s", "256M", backing], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", backing], capture_output=True, text=True, check=True).stdout.strip()
    try:
        shoal("volume", "format", dev, "--name", "loopvol", check=True)
        data = tmp_path / "data.raw"
        with open(data, "wb") as f:
            f.truncate(64 * MiB)
            f.seek(3 * MiB)
            f.write(os.urandom(5 * MiB))
        shoal("file", "import", "--volume", dev, str(data), "/d.raw", check=True)
        shoal("file", "export", "--volume", dev, "/d.raw", str(tmp_path / "back.raw"), check=True)
        assert _sha(str(data)) == _sha(str(tmp_path / "back.raw"))
        with Volume.open(dev) as vol:
            f = vol.create("/small", MiB)
            f.pwrite(12345, b"loop")
            assert f.pread(0, 12345) == bytes(12345)  # BLKZEROOUT (or the fallback) zeroed the unit
        assert shoal("volume", "fsck", dev).returncode == 0
        info = json.loads(shoal("volume", "info", dev, "--json", check=True).stdout)
        assert info["name"] == "loopvol" and info["size"] == 256 * MiB
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_backup_superblock_sits_at_the_end(volume_path: str) -> None:
    with Device(volume_path, writable=False) as dev:
        sb, _ = read_superblock(dev)
        assert dev.pread(dev.size - 4096, 4096) == dev.pread(0, 4096)
        area = LeaseArea(dev, sb)
        assert area.read_lease() == CoordinatorLease(epoch=area.read_lease().epoch)
        assert area.read_slot(3) == LivenessSlot(node_id=3)


def test_offline_tool_stops_when_another_claimant_took_the_lease(volume_path: str) -> None:
    vol = Volume.open(volume_path)
    vol.mkdir("/before")
    with Device(volume_path) as dev:
        sb, _ = read_superblock(dev)
        LeaseArea(dev, sb).write_lease(CoordinatorLease(owner=3, epoch=99, cluster="lab"))
    with pytest.raises(VolumeInUseError, match="coordinator node3"):
        vol.mkdir("/after")
    vol._closed = True  # the tool must not release a lease that is not its own any more
    vol.device.close()
    with Volume.open(volume_path, offline=False, writable=False) as ro:
        assert ro.exists("/before") and not ro.exists("/after")
