"""The volume API on a real image file: namespace, holes, thick files, no stale data."""

from __future__ import annotations

import os

import pytest

from shoal.volume import Volume, format_volume
from shoal.volume.defrag import defrag
from shoal.volume.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidName,
    NotFound,
    VolumeError,
    VolumeFull,
)
from shoal.volume.fsck import fsck

MiB = 1 << 20


def test_namespace_operations_persist(volume_path: str) -> None:
    with Volume.open(volume_path) as vol:
        vol.mkdir("/a/b", parents=True)
        vol.create("/a/b/f", 3 * MiB)
        vol.rename("/a/b/f", "/a/g")
        with pytest.raises(AlreadyExists):
            vol.mkdir("/a")
        with pytest.raises(DirectoryNotEmpty):
            vol.remove("/a")
        with pytest.raises(InvalidName):
            vol.mkdir("/a/..")
        with pytest.raises(NotFound):
            vol.stat("/nope")
        with pytest.raises(InvalidName):
            vol.rename("/a", "/a/b/inside")
    with Volume.open(volume_path, writable=False) as vol:
        assert [s.path for s in vol.listdir("/a")] == ["/a/b", "/a/g"]
        assert vol.stat("/a/g").size == 3 * MiB
        assert vol.stat("/a/g").allocated == 0
    assert fsck(volume_path).exit_code == 0


def test_holes_read_zero_and_writes_allocate_only_their_units(volume_path: str) -> None:
    with Volume.open(volume_path) as vol:
        f = vol.create("/disk", 64 * MiB)
        f.pwrite(10 * MiB + 5, b"x" * 100)
        assert f.pread(10 * MiB, 5) == bytes(5)
        assert f.pread(10 * MiB + 5, 100) == b"x" * 100
        assert f.pread(0, 4096) == bytes(4096)
        assert vol.stat("/disk").allocated == MiB
        assert f.block_status(0, 64 * MiB) == [(0, 10 * MiB, True), (10 * MiB, MiB, False), (11 * MiB, 53 * MiB, True)]
        with pytest.raises(VolumeError):
            f.pwrite(64 * MiB - 1, b"ab")


def test_no_stale_data_after_delete(small_unit_volume: str) -> None:
    """DESIGN §2: a newly allocated unit never exposes bytes of a deleted file."""
    marker = b"STALE!!!" * 512
    with Volume.open(small_unit_volume) as vol:
        unit = vol.sb.unit_size
        free_units = vol.sb.unit_count - vol.meta.used_units
        f = vol.create("/marker", free_units * unit)
        for off in range(0, free_units * unit, 4 << 20):
            f.pwrite(off, marker * ((min(4 << 20, free_units * unit - off)) // len(marker)))
        vol.remove("/marker")
        # small writes into new sparse files, extension of a file, thick files: never the marker
        g = vol.create("/sparse", free_units * unit // 2)
        for k in range(0, free_units // 2, 7):
            g.pwrite(k * unit + 100, b"new")
        h = vol.create("/grow", 1000)
        h.pwrite(0, b"y" * 1000)
        h.resize(3 * unit)
        t = vol.create("/thick", 8 * unit, preallocate=True)
        for name, fh in (("/sparse", g), ("/grow", h), ("/thick", t)):
            size = fh.size
            for off in range(0, size, 1 << 20):
                assert b"STALE!!!" not in fh.pread(off, min(1 << 20, size - off)), name


def test_shrink_then_grow_reads_zeros(volume_path: str) -> None:
    with Volume.open(volume_path) as vol:
        f = vol.create("/f", 2 * MiB)
        f.pwrite(0, b"a" * (2 * MiB))
        f.resize(100)
        f.resize(2 * MiB)
        assert f.pread(0, 100) == b"a" * 100
        assert f.pread(100, MiB) == bytes(MiB)
        assert vol.stat("/f").allocated == MiB


def test_thick_file_trim_and_zero(volume_path: str) -> None:
    with Volume.open(volume_path) as vol:
        t = vol.create("/thick", 4 * MiB, preallocate=True)
        assert vol.stat("/thick").allocated == 4 * MiB
        t.pwrite(0, b"q" * (4 * MiB))
        t.discard(0, 4 * MiB)  # thick files keep their units
        assert vol.stat("/thick").allocated == 4 * MiB
        t.write_zeroes(MiB, 2 * MiB)
        assert t.pread(MiB, 2 * MiB) == bytes(2 * MiB)
        s = vol.create("/thin", 4 * MiB)
        s.pwrite(0, b"q" * (4 * MiB))
        s.discard(MiB // 2, 3 * MiB)  # frees units 1 and 2 only (whole units)
        assert vol.stat("/thin").allocated == 2 * MiB
        s.write_zeroes(0, MiB // 2)
        assert s.pread(0, MiB) == bytes(MiB // 2) + b"q" * (MiB // 2)


def test_full_volume_is_a_clear_error_and_loses_nothing(small_unit_volume: str) -> None:
    with Volume.open(small_unit_volume) as vol:
        total = vol.sb.unit_count * vol.sb.unit_size
        f = vol.create("/big", total * 2)
        f.pwrite(0, b"k" * 4096)
        with pytest.raises(VolumeFull, match="full"):
            f.pwrite(vol.sb.unit_size, b"z" * total)
        assert f.pread(0, 4096) == b"k" * 4096
    assert fsck(small_unit_volume).exit_code == 0


def test_defrag_makes_files_contiguous_with_same_content(small_unit_volume: str) -> None:
    with Volume.open(small_unit_volume) as vol:
        unit = vol.sb.unit_size
        a = vol.create("/a", 40 * unit)
        b = vol.create("/b", 40 * unit)
        for k in range(40):  # interleave so both fragment
            a.pwrite(k * unit, os.urandom(64) * (unit // 64))
            b.pwrite(k * unit, os.urandom(64) * (unit // 64))
        before = {p: vol.open_file(p).pread(0, 40 * unit) for p in ("/a", "/b")}
        assert vol.stat("/a").extents > 1
        result = defrag(vol)
        assert sorted(result.moved) == ["/a", "/b"]
        for p in ("/a", "/b"):
            assert vol.stat(p).extents == 1
            assert vol.open_file(p).pread(0, 40 * unit) == before[p]
    assert fsck(small_unit_volume).exit_code == 0


def test_sixteen_tib_volume_is_addressable() -> None:
    # ext4 caps files just below 16 TiB; tmpfs does not (the file stays sparse: ~40 MiB used)
    path = f"/dev/shm/shoal-16t-{os.getpid()}.img"
    size = 16 << 40
    format_volume(path, size)
    try:
        _write_at_the_far_end(path)
    finally:
        os.unlink(path)


def _write_at_the_far_end(path: str) -> None:
    with Volume.open(path) as vol:
        f = vol.create("/far", vol.sb.unit_count * vol.sb.unit_size, exist_ok=False)
        # steer the allocator to the last units so the data lands past 15 TiB on the LUN
        with vol._lock:
            vol.meta._hint = vol.sb.unit_count - 2
        f.pwrite(f.size - 4096, b"end!")
        lun = f.extent_map()[-1][1]
        assert lun > 15 << 40
        assert f.pread(f.size - 4096, 4) == b"end!"
    assert fsck(path).exit_code == 0


def test_write_into_a_hole_filled_by_several_free_runs(small_unit_volume: str) -> None:
    """Free space in pieces: one write's hole is filled from several runs, data intact."""
    with Volume.open(small_unit_volume) as vol:
        unit = vol.sb.unit_size
        pads = [vol.create(f"/pad{k}", unit) for k in range(14)]
        for p in pads:
            p.pwrite(0, b"p" * unit)
        rest = vol.sb.unit_count - vol.meta.used_units
        vol.create("/fill", rest * unit).pwrite(0, bytes(rest * unit))  # no large free run left
        for k in range(0, 14, 2):  # free every other unit: the free space is now in 1-unit runs
            vol.remove(f"/pad{k}")
        with vol._lock:
            vol.meta._hint = 0
        f = vol.create("/f", 8 * unit)
        data = os.urandom(6 * unit)
        f.pwrite(unit // 2, data)
        assert vol.stat("/f").extents > 1
        assert f.pread(unit // 2, 6 * unit) == data
        assert f.pread(0, unit // 2) == bytes(unit // 2)
        for k in range(1, 14, 2):
            assert vol.open_file(f"/pad{k}").pread(0, unit) == b"p" * unit
    assert fsck(small_unit_volume).exit_code == 0


def test_a_volume_whose_memory_ran_ahead_of_its_journal_is_never_checkpointed(
    volume_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op that fails half-applied leaves memory unlike the journal: no checkpoint may
    save that state (the coordinator checkpoints before a hand-over); a reopen replays."""
    with Volume.open(volume_path) as vol:
        vol.mkdir("/kept")
        apply = vol.meta.apply

        def half(op: object) -> object:
            apply(op)  # type: ignore[arg-type]
            raise RuntimeError("a bug half-way through an op")

        monkeypatch.setattr(vol.meta, "apply", half)
        with pytest.raises(RuntimeError):
            vol.mkdir("/half")
        with pytest.raises(VolumeError, match="stopped taking changes"):
            vol.checkpoint()
    with Volume.open(volume_path, writable=False) as vol:
        assert [s.path for s in vol.listdir("/")] == ["/kept"]
    assert fsck(volume_path).exit_code == 0
