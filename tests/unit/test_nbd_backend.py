"""FileBackend semantics on a real sparse file."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shoal.nbd.backend import BlockSizes, FileBackend
from shoal.nbd.constants import STATE_HOLE, STATE_ZERO
from shoal.nbd.errors import BackendError

MiB = 1 << 20
HOLE = STATE_HOLE | STATE_ZERO


@pytest.fixture
def backend(tmp_path: object) -> Iterator[FileBackend]:
    path = os.path.join(str(tmp_path), "disk.raw")
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    b = FileBackend(path)
    yield b
    b.close()


def test_holes_read_zero_and_writes_allocate(backend: FileBackend) -> None:
    assert backend.size == 8 * MiB
    assert backend.block_status(0, 8 * MiB) == [(8 * MiB, HOLE)]
    assert backend.read(MiB, 4096) == bytes(4096)
    backend.write(MiB, b"x" * 8192)
    assert backend.read(MiB + 4000, 200) == b"x" * 200
    assert backend.block_status(0, 4 * MiB) == [(MiB, HOLE), (8192, 0), (3 * MiB - 8192, HOLE)]
    assert backend.block_status(MiB + 4096, 4096) == [(4096, 0)]


def test_write_zeroes_and_trim(backend: FileBackend) -> None:
    backend.write(0, b"y" * (2 * MiB))
    backend.write_zeroes(0, MiB, may_trim=False, fua=True)
    assert backend.read(0, MiB) == bytes(MiB)
    assert backend.block_status(0, MiB) == [(MiB, 0)]  # zeroed, still allocated
    backend.write_zeroes(0, MiB, may_trim=True)
    assert backend.block_status(0, MiB) == [(MiB, HOLE)]
    backend.trim(MiB, MiB)
    assert backend.block_status(0, 2 * MiB) == [(2 * MiB, HOLE)]
    backend.flush()


def test_read_only_and_missing_file(tmp_path: object) -> None:
    with pytest.raises(BackendError, match="cannot open"):
        FileBackend(os.path.join(str(tmp_path), "missing.raw"))


def test_block_size_constraints_are_validated() -> None:
    BlockSizes(512, 4096, 32 * MiB)
    for bad in ((3, 4096, MiB), (512, 256, MiB), (512, 4096, 1000), (1 << 17, 1 << 17, 1 << 20)):
        with pytest.raises(ValueError):
            BlockSizes(*bad)
