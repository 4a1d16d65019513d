"""Corruption of the volume's structures: detected by checksums, named, repaired.

For each region — primary superblock, backup superblock, a live journal record (not the
last one: damage to the last record is indistinguishable from a torn write and ends the
log, FORMAT.md §4), checkpoint slot A, slot B, both slots, the coordinator lease sector
and the offline tool's liveness slot — random bytes are flipped inside the bytes the
structure really uses (the checksummed fields; reserved zeros and padding that no
checksum covers are left alone), at positions taken from the superblock and headers.
Then the real CLI runs in subprocesses: ``file ls``, ``volume info``, ``volume fsck``,
``fsck --repair``, ``fsck`` again, ``file ls`` again. Asserted: no traceback anywhere;
the damaged structure is named; fsck exits 1 before repair; ``--repair`` exits 1 and
says fixed; fsck then exits 0 and ``file ls`` prints no warning; every file that should
survive reads back with its content; with the primary superblock damaged, commands work
from the backup and say so.

The image has live journal records: a writer opened it with ``offline=False`` and was
SIGKILLed before closing.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.volume import Volume, checkpoint, format_volume, journal, ops
from shoal.volume.device import Device
from shoal.volume.fsck import fsck
from shoal.volume.layout import BLOCK
from shoal.volume.volume import read_superblock
from tests.conftest import assert_no_traceback, shoal

UNIT = 64 << 10
REPO = Path(__file__).resolve().parents[2]
SEEDS = [1, 2, 3]

#: files written and closed cleanly (in the checkpoint): path -> (size, preallocated)
BASE_FILES = {
    "/a": (3 * UNIT + 5000, False),
    "/dir/b": (2 * UNIT, True),
    "/dir/c": (0, False),
    "/big": (10 * UNIT, False),
}
#: files a writer creates (journal only) before it is killed
JOURNAL_FILES = [f"/g{i}" for i in range(6)]


def content(path: str, size: int) -> bytes:
    """Deterministic content: non-zero bytes with a hole in the second unit."""
    rnd = random.Random(path)
    data = bytearray(rnd.randbytes(size))
    data[UNIT : min(2 * UNIT, size)] = bytes(max(0, min(2 * UNIT, size) - UNIT))
    return bytes(data)


def _write(vol: Volume, path: str, size: int, pre: bool) -> None:
    f = vol.create(path, size, preallocate=pre)
    data = content(path, size)
    if size:
        f.pwrite(0, data[:UNIT])
        if size > 2 * UNIT:
            f.pwrite(2 * UNIT, data[2 * UNIT :])


WRITER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from tests.integration.test_volume_corruption import JOURNAL_FILES, UNIT, _write
from shoal.volume import Volume
vol = Volume.open({path!r}, offline=False)
for i, p in enumerate(JOURNAL_FILES):
    _write(vol, p, (i + 1) * UNIT + 777 * i, False)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """The image, and for each journal file the index of the last journal record touching it."""
    path = str(tmp_path_factory.mktemp("corrupt") / "base.img")
    format_volume(path, 64 << 20, unit_size=UNIT, name="corrupt")
    with Volume.open(path) as vol:  # offline: writes the lease sector and slot 65
        vol.mkdir("/dir")
        for p, (size, pre) in BASE_FILES.items():
            _write(vol, p, size, pre)
    proc = subprocess.run([sys.executable, "-c", WRITER.format(repo=str(REPO), path=path)],
                          capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert proc.returncode == -9, proc.stderr
    last: dict[str, int] = {}
    with Device(path, writable=False) as dev:
        sb, _ = read_superblock(dev)
        records = _records(dev)
    names: dict[int, str] = {}
    for i, rec in enumerate(records):
        for op in rec.ops:
            if isinstance(op, ops.Create):
                names[op.ino] = "/" + op.name
            ino = getattr(op, "ino", None)
            if ino in names:
                last[names[ino]] = i
    assert sorted(last) == sorted(JOURNAL_FILES), last
    assert len(records) >= 10
    return path, last


def _records(dev: Device) -> list[journal.Record]:
    sb, _ = read_superblock(dev)
    heads = [h for h in (checkpoint.read_header(dev, o, sb.uuid) for o in (sb.ckpt_a_offset, sb.ckpt_b_offset)) if h]
    return journal.scan(dev, sb, max(h.seq for h in heads)).records


def _flip(path: str, ranges: list[tuple[int, int]], rng: random.Random) -> list[int]:
    """XOR 1-4 random bytes inside ``ranges`` ([start, end) byte offsets) with non-zero values."""
    positions = [p for s, e in ranges for p in range(s, e)]
    picked = sorted(rng.sample(positions, rng.randint(1, 4)))
    with open(path, "r+b") as f:
        for pos in picked:
            f.seek(pos)
            old = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([old ^ rng.randrange(1, 256)]))
    return picked


def _slot_ranges(dev: Device, offset: int) -> list[tuple[int, int]]:
    body_len = struct.unpack_from("<Q", dev.pread(offset, BLOCK), 48)[0]
    return [(offset, offset + 80), (offset + BLOCK, offset + BLOCK + body_len)]


def corrupt(path: str, region: str, rng: random.Random, last: dict[str, int]) -> dict[str, bytes]:
    """Damage ``region``; return the files that must survive repair, with their content."""
    with Device(path, writable=False) as dev:
        sb, _ = read_superblock(dev)
        lease = sb.lease_offset
        records = _records(dev)
        slot_a, slot_b = _slot_ranges(dev, sb.ckpt_a_offset), _slot_ranges(dev, sb.ckpt_b_offset)
    everything = {p: content(p, s) for p, (s, _) in BASE_FILES.items()}
    everything.update({p: content(p, (i + 1) * UNIT + 777 * i) for i, p in enumerate(JOURNAL_FILES)})
    sb_used = [(0, 192), (BLOCK - 4, BLOCK)]
    if region == "primary superblock":
        _flip(path, sb_used, rng)
    elif region == "backup superblock":
        _flip(path, [(sb.backup_offset + s, sb.backup_offset + e) for s, e in sb_used], rng)
    elif region == "journal record":
        k = rng.randrange(len(records) - 1)  # never the last one
        rec = records[k]
        base = sb.journal_offset + rec.offset
        with Device(path, writable=False) as dev:
            plen = struct.unpack_from("<I", dev.pread(base, BLOCK), 40)[0]
        _flip(path, [(base, base + 52), (base + 56, base + 56 + plen)], rng)
        return {p: d for p, d in everything.items() if last.get(p, -1) < k}
    elif region == "checkpoint slot A":
        _flip(path, slot_a, rng)
    elif region == "checkpoint slot B":
        _flip(path, slot_b, rng)
    elif region == "both checkpoint slots":
        _flip(path, slot_a, rng)
        _flip(path, slot_b, rng)
        return {}  # salvage keeps what still parses: nothing is promised
    elif region == "coordinator lease":
        _flip(path, [(lease, lease + 160), (lease + BLOCK - 4, lease + BLOCK)], rng)
    elif region == "liveness slot 65":
        s65 = lease + 65 * BLOCK
        _flip(path, [(s65, s65 + 192), (s65 + BLOCK - 4, s65 + BLOCK)], rng)
    else:
        raise AssertionError(region)
    return everything


#: region -> (words fsck must print, ls exit, words ls must print, info exit, words info must print)
EXPECT: dict[str, tuple[list[str], int, list[str], int, list[str]]] = {
    "primary superblock": (["primary superblock"], 0, ["primary superblock", "using the backup superblock"],
                           0, ["primary superblock", "using the backup superblock"]),
    # ls never reads the backup superblock or slot 65; info surveys both and names them
    "backup superblock": (["backup superblock"], 0, [], 0, ["backup superblock", "damaged"]),
    "journal record": (["journal record"], 1, ["journal record", "damaged", "fsck --repair"], 0, ["journal record", "damaged"]),
    "checkpoint slot A": (["checkpoint slot a"], 0, ["checkpoint slot a is damaged"], 0, ["checkpoint slot a is damaged"]),
    "checkpoint slot B": (["checkpoint slot b"], 0, ["checkpoint slot b is damaged"], 0, ["checkpoint slot b is damaged"]),
    "both checkpoint slots": (["checkpoint slot a", "checkpoint slot b"], 1, ["both metadata checkpoints", "damaged"],
                              1, ["both metadata checkpoints", "damaged"]),
    "coordinator lease": (["coordinator lease"], 1, ["coordinator lease", "damaged"], 0, ["coordinator lease", "damaged"]),
    "liveness slot 65": (["liveness slot 65"], 0, [], 0, ["liveness slot 65", "damaged"]),
}


def _run(*args: str) -> tuple[int, str]:
    proc = shoal(*args, timeout=60)
    assert_no_traceback(proc)
    return proc.returncode, (proc.stdout + proc.stderr)


def _run_both(a: list[str], b: list[str]) -> list[tuple[int, str]]:
    """Two read-only commands at once (each is mostly Python start-up)."""
    procs = [subprocess.Popen([sys.executable, "-m", "shoal", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in (a, b)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stdout + stderr, stdout + stderr
        out.append((proc.returncode, stdout + stderr))
    return out


def _names(out: str, words: list[str], what: str) -> None:
    low = out.lower()
    missing = [w for w in words if w.lower() not in low]
    assert not missing, f"{what} does not name the damage ({missing}):\n{out}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("region", list(EXPECT))
def test_damage_is_detected_named_and_repaired(base_image: tuple[str, dict[str, int]], tmp_path: Path,
                                               region: str, seed: int) -> None:
    base, last = base_image
    vol = str(tmp_path / "vol.img")
    shutil.copyfile(base, vol)
    rng = random.Random(f"{region}/{seed}")
    survivors = corrupt(vol, region, rng, last)
    fsck_words, ls_rc, ls_words, info_rc, info_words = EXPECT[region]

    (rc, out), (irc, iout) = _run_both(["file", "ls", "--volume", vol, "/"], ["volume", "info", vol])
    assert rc == ls_rc, out
    _names(out, ls_words, "file ls")
    rc, out = irc, iout
    assert rc == info_rc, out
    _names(out, info_words, "volume info")
    if region == "liveness slot 65":  # a command that writes needs slot 65 and must say so
        rc, out = _run("file", "mkdir", "--volume", vol, "/new")
        assert rc == 1, out
        _names(out, ["liveness slot 65", "damaged"], "file mkdir")

    rc, out = _run("volume", "fsck", vol)
    assert rc == 1, out
    _names(out, fsck_words + ["problem", "--repair"], "fsck")
    rc, out = _run("volume", "fsck", "--repair", vol)
    assert rc == 1, out
    _names(out, fsck_words + ["fixed", "repaired"], "fsck --repair")
    rc, out = _run("volume", "fsck", vol)
    assert rc == 0 and "clean" in out, out

    rc, out = _run("file", "ls", "--volume", vol, "-l", "/")
    assert rc == 0 and "warning" not in out, out
    with Volume.open(vol, writable=False) as v:
        for path, data in survivors.items():
            st = v.stat(path)
            assert st.size == len(data), path
            assert v.open_file(path).pread(0, st.size) == data if st.size else True, path
        files = list(v.walk_files())  # whatever else survived reads without error
        for path, st in files:
            if st.size:
                v.open_file(path).pread(0, st.size)
    with Volume.open(vol) as v:  # the volume takes new writes after repair
        v.mkdir("/after-repair")
        v.create("/after-repair/f", UNIT).pwrite(0, b"x" * UNIT)
    assert fsck(vol).exit_code == 0


def test_both_superblocks_damaged_is_a_sentence(base_image: tuple[str, dict[str, int]], tmp_path: Path) -> None:
    """Nothing can be repaired without a superblock, but every command says why."""
    base, _ = base_image
    vol = str(tmp_path / "vol.img")
    shutil.copyfile(base, vol)
    rng = random.Random(9)
    with Device(vol, writable=False) as dev:
        sb, _ = read_superblock(dev)
    _flip(vol, [(8, 192)], rng)  # past the magic: damaged, not "not a volume"
    _flip(vol, [(sb.backup_offset + 8, sb.backup_offset + 192)], rng)
    (rc, out), (irc, iout) = _run_both(["file", "ls", "--volume", vol, "/"], ["volume", "info", vol])
    for code, text in ((rc, out), (irc, iout)):
        assert code in (1, 2), text
        assert "superblock" in text and "Traceback" not in text, text
    rc, out = _run("volume", "fsck", "--repair", vol)
    assert rc == 2 and "both superblocks" in out, out
