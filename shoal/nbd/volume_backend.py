"""Exports of a shoal volume: one export per regular file, named by its path.

:class:`VolumeExports` is the mapping export-name -> :class:`Backend` the
server is given; it looks files up lazily, so a file created after the server
started is served too (``NBD_OPT_LIST`` shows the files present at the time).

Semantics, mapped onto :class:`shoal.volume.VolumeFile`:

============================  ================================================
NBD                           volume
============================  ================================================
READ (holes)                  ``pread``: holes read as zeros
WRITE (into a hole)           ``pwrite(durable=False)`` allocates the units it
                              touches; FLUSH or FUA makes the allocation durable
TRIM                          ``discard``: frees whole units in the range only
WRITE_ZEROES                  ``write_zeroes``: whole units freed, edges zeroed
WRITE_ZEROES + NO_HOLE        zeros written (no unit freed)
FLUSH, FUA                    ``flush``: data and metadata durable
BLOCK_STATUS base:allocation  ``block_status``: holes are HOLE|ZERO
============================  ================================================

Volume calls can block on the journal (an allocating write may wait for a
commit), so every request goes through the server's thread pool
(``inline_max = 0``); the event loop never waits on a volume lock.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from shoal.nbd.backend import Backend, Extent
from shoal.nbd.constants import STATE_HOLE, STATE_ZERO
from shoal.nbd.errors import BackendError

if TYPE_CHECKING:
    from shoal.volume import Volume, VolumeFile

_ZEROS = bytes(1 << 20)


def _backend_error(what: str, err: Exception) -> BackendError:
    from shoal.volume.errors import VolumeFull

    code = errno.ENOSPC if isinstance(err, VolumeFull) else errno.EIO
    return BackendError(f"{what} failed: {err}", code)


class VolumeFileBackend(Backend):
    """One file of an open volume."""

    inline_max = 0
    can_multi_conn = True  # one VolumeFile, one page cache, one journal for all connections

    def __init__(self, file: VolumeFile, *, name: str = "", read_only: bool = False):
        self.file = file
        self.read_only = read_only
        self.description = name

    @property
    def size(self) -> int:
        return self.file.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        try:
            data = self.file.pread(offset, len(buf))
        except Exception as err:
            raise _backend_error("read", err) from err
        buf[: len(data)] = data

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        try:
            # without FUA a write need not be durable until FLUSH: do not wait for the
            # journal commit of new allocations (FLUSH makes them durable)
            self.file.pwrite(offset, data, durable=False)
            if fua:
                self.file.flush()
        except Exception as err:
            raise _backend_error("write", err) from err

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        try:
            if may_trim:
                self.file.write_zeroes(offset, length)
            else:
                end = offset + length
                while offset < end:
                    n = min(len(_ZEROS), end - offset)
                    self.file.pwrite(offset, memoryview(_ZEROS)[:n], durable=False)
                    offset += n
            if fua:
                self.file.flush()
        except Exception as err:
            raise _backend_error("write zeroes", err) from err

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        try:
            self.file.discard(offset, length)
            if fua:
                self.file.flush()
        except Exception as err:
            raise _backend_error("trim", err) from err

    def flush(self) -> None:
        try:
            self.file.flush()
        except Exception as err:
            raise _backend_error("flush", err) from err

    def block_status(self, offset: int, length: int) -> list[Extent]:
        try:
            runs = self.file.block_status(offset, length)
        except Exception as err:
            raise _backend_error("block status", err) from err
        return [(n, STATE_HOLE | STATE_ZERO if hole else 0) for _, n, hole in runs]


class VolumeExports(Mapping[str, Backend]):
    """Export name (a file path like ``/vm/disk0.raw``) -> backend, looked up lazily."""

    def __init__(self, volume: Volume, *, read_only: bool = False):
        self.volume = volume
        self.read_only = read_only
        self._cache: dict[int, VolumeFileBackend] = {}

    def __getitem__(self, name: str) -> Backend:
        from shoal.volume.errors import VolumeError

        try:
            st = self.volume.stat(name)
        except VolumeError as err:
            raise KeyError(name) from err
        if st.kind != "file":
            raise KeyError(name)
        # keyed by inode, not name: after a rename, the name serves whatever file now has
        # it, never the old inode (and name variants like //a share one backend)
        cached = self._cache.get(st.ino)
        if cached is not None:
            return cached
        try:
            backend = VolumeFileBackend(self.volume.open_file(name), name=st.path, read_only=self.read_only)
        except VolumeError as err:
            raise KeyError(name) from err
        self._cache[st.ino] = backend
        return backend

    def __iter__(self) -> Iterator[str]:
        return (path for path, _ in self.volume.walk_files())

    def __len__(self) -> int:
        return sum(1 for _ in self.volume.walk_files())
