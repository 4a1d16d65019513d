"""Copy files into and out of a volume, keeping holes.

Import finds the source's data with ``SEEK_DATA``/``SEEK_HOLE`` and also skips units
that read as all zeros, so a volume file only gets units for real data (unless
``preallocate``). Export writes only the mapped, non-zero units of a file into a sparse
destination of the same size, so ``qemu-img map`` shows the same holes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator

from shoal.errors import UsageError
from shoal.volume.volume import Volume

CHUNK = 8 << 20


@contextlib.contextmanager
def _host_io(path: str, doing: str) -> Iterator[None]:
    """A failing host file (disk full, I/O error, /dev/full) is a sentence, not a traceback."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"{doing} {path} failed: {err.strerror}") from err


def _data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def _nonzero_runs(buf: bytes | bytearray, length: int, unit: int, zero: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) byte runs of ``buf[:length]`` made of units that are not all zero."""
    run_start = None
    for off in range(0, length, unit):
        n = min(unit, length - off)
        # startswith compares in place (memcmp); slicing a memoryview to compare is 50x slower
        is_zero = buf.startswith(zero if n == unit else bytes(n), off)
        if not is_zero and run_start is None:
            run_start = off
        elif is_zero and run_start is not None:
            yield run_start, off
            run_start = None
    if run_start is not None:
        yield run_start, length


def _source_size(fd: int, path: str) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise UsageError(f"{path} is not a regular file or block device")


def import_file(vol: Volume, src: str, dst: str, *, preallocate: bool = False, force: bool = False,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy ``src`` (host path) to ``dst`` (volume path); returns bytes of data written."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot read {src}: {err.strerror}") from err
    try:
        size = _source_size(fd, src)
        if vol.exists(dst):
            if not force:
                raise UsageError(f"{dst} already exists on the volume; use --force to replace it")
            vol.remove(dst)
        f = vol.create(dst, size, preallocate=preallocate)
        U = vol.sb.unit_size
        zero = bytes(U)
        written = 0
        chunk = max(CHUNK // U, 1) * U
        buf = bytearray(chunk)
        view = memoryview(buf)
        with _host_io(src, "reading"):
            segments = list(_data_segments(fd, size))
        for start, end in segments:
            pos = start // U * U
            while pos < end:
                n = min(chunk, end - pos, size - pos)
                with _host_io(src, "reading"):
                    got = os.preadv(fd, [view[:n]], pos)
                if got < n:
                    view[got:n] = bytes(n - got)
                for a, b in _nonzero_runs(buf, n, U, zero):
                    f.pwrite(pos + a, view[a:b], durable=False)
                    written += b - a
                if progress:
                    progress(n)
                pos += n
        f.flush()
        return written
    finally:
        os.close(fd)


def export_file(vol: Volume, src: str, dst: str, *, force: bool = False,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy volume file ``src`` to host path ``dst`` (sparse); returns bytes written."""
    f = vol.open_file(src)
    size = f.size
    if os.path.exists(dst) and not force:
        raise UsageError(f"{dst} already exists; use --force to overwrite it")
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UsageError(f"cannot write {dst}: {err.strerror}") from err
    written = 0
    try:
        with _host_io(dst, "writing"):
            os.ftruncate(fd, size)
            U = vol.sb.unit_size
            zero = bytes(U)
            for off, length, hole in f.block_status(0, size) if size else []:
                if hole:
                    continue
                pos, end = off, off + length
                while pos < end:
                    n = min(CHUNK, end - pos)
                    buf = f.pread(pos, n)
                    for a, b in _nonzero_runs(buf, len(buf), U, zero):
                        os.pwrite(fd, memoryview(buf)[a:b], pos + a)
                        written += b - a
                    if progress:
                        progress(n)
                    pos += n
            os.fsync(fd)
    finally:
        os.close(fd)
    return written
