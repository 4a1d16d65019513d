"""What an NBD export is backed by, and how the server finds it.

The server knows exports only through these classes; it never imports the
volume package or the node agent. Two kinds of backend:

- :class:`Backend` is blocking and thread-safe: the server runs small requests
  inline on the event loop (page-cache I/O takes microseconds, and a thread hop
  costs more than that) and larger ones in a thread pool, choosing by
  :attr:`Backend.inline_max`.
- :class:`AsyncBackend` has coroutine methods, for backends that themselves
  wait on the network (a coordinator, an NBD client to a LUN) on the server's
  event loop. Each request runs as a task; many run at once per connection.

Contract every backend keeps:

- all offsets and lengths are checked by the server against :attr:`size`
  before a backend sees them;
- a read returns (or fills) exactly the bytes asked for (holes read as zeros);
- after ``flush`` returns, every write that completed before it is durable;
  ``fua=True`` makes one write durable before it returns;
- ``block_status`` returns ``(length, flags)`` runs, flags from
  ``base:allocation`` (``STATE_HOLE``, ``STATE_ZERO``), covering at least one
  byte and at most the asked range;
- failures raise :class:`BackendError` carrying the NBD error value to return;
- an :class:`AsyncBackend` is cancellation-safe: the server cancels a request's
  task when its connection is torn down (no reply is sent for it).

Exports are found by name either in a plain mapping name -> backend (looked up
synchronously) or through an :class:`ExportResolver`, whose coroutines the
handshake waits for without reading further.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from shoal.nbd.constants import DEFAULT_MAX_BLOCK, STATE_HOLE, STATE_ZERO
from shoal.nbd.errors import BackendError

Extent = tuple[int, int]  # (length, base:allocation flags)


@dataclass(frozen=True)
class BlockSizes:
    """Block-size constraints advertised with ``NBD_INFO_BLOCK_SIZE``."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_BLOCK

    def __post_init__(self) -> None:
        def pow2(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        if not (pow2(self.minimum) and self.minimum <= 65536):
            raise ValueError("minimum block size must be a power of two up to 64 KiB")
        if not (pow2(self.preferred) and self.preferred >= max(self.minimum, 512)):
            raise ValueError("preferred block size must be a power of two >= max(minimum, 512)")
        if self.maximum % self.minimum or self.maximum < self.preferred:
            raise ValueError("maximum block size must be a multiple of minimum and >= preferred")


class Backend(ABC):
    """One export's storage. Subclass it; the server calls only these methods."""

    #: refuse writes (the export is advertised READ_ONLY)
    read_only: bool = False
    #: every connection sees the same data and a flush on one covers all
    can_multi_conn: bool = True
    #: requests up to this many bytes run on the event loop thread
    inline_max: int = 0
    block_sizes: BlockSizes = BlockSizes()
    #: shown by NBD_INFO_DESCRIPTION
    description: str = ""

    @property
    @abstractmethod
    def size(self) -> int:
        """Export size in bytes."""

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    @abstractmethod
    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (allocating holes).

        ``data`` is often a view of a buffer the server reuses: do not keep it
        after returning.
        """

    @abstractmethod
    def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        """Make the range read as zeros; free space only if ``may_trim``."""

    @abstractmethod
    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Hint that the range is unused; contents become unspecified."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation runs from ``offset``; the default says "all data"."""
        return [(length, 0)]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default does nothing."""


class AsyncBackend(ABC):
    """One export's storage, reached with coroutines on the server's event loop.

    The server runs each request as its own task, so calls overlap freely, also
    on one connection, and complete in any order. A ``write`` gets an immutable
    copy of the payload.
    """

    #: refuse writes (the export is advertised READ_ONLY)
    read_only: bool = False
    #: every connection sees the same data and a flush on one covers all
    can_multi_conn: bool = True
    block_sizes: BlockSizes = BlockSizes()
    #: shown by NBD_INFO_DESCRIPTION
    description: str = ""

    @property
    @abstractmethod
    def size(self) -> int:
        """Export size in bytes."""

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset``."""

    @abstractmethod
    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data`` at ``offset``."""

    @abstractmethod
    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        """Make the range read as zeros; free space only if ``may_trim``."""

    @abstractmethod
    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Hint that the range is unused; contents become unspecified."""

    @abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation runs from ``offset``; the default says "all data"."""
        return [(length, 0)]

    def read_now(self, offset: int, length: int, done: ReadDone) -> bool:
        """Optional fast path for a read the server would otherwise run as a task:
        start it from the server's callback and, later, call ``done(data, None)`` or
        ``done(None, error)`` exactly once (never before returning); True if started.
        The default starts nothing."""
        return False


#: how a read started with ``AsyncBackend.read_now`` ends: (data, None) or (None, error)
ReadDone: TypeAlias = Callable[[bytes | None, BaseException | None], None]
AnyBackend: TypeAlias = Backend | AsyncBackend


class ExportResolver(ABC):
    """Finds exports by name with coroutines (e.g. by asking a coordinator).

    Names arrive exactly as the client sent them (valid UTF-8 without NUL); any
    normalisation is the resolver's business. An exception from either method
    is answered to that client with ``NBD_REP_ERR_UNKNOWN`` and its text; the
    connection stays usable.
    """

    @abstractmethod
    async def resolve(self, name: str) -> AnyBackend | None:
        """The backend of export ``name``, or None if there is none."""

    @abstractmethod
    async def names(self) -> list[str]:
        """Export names for NBD_OPT_LIST."""


# --- FileBackend --------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

_ZERO_CHUNK = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system cannot do ``mode``."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


def _nbd_errno(err: OSError) -> int:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return errno.ENOSPC
    if err.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return errno.EPERM
    return errno.EIO


class FileBackend(Backend):
    """A raw image file or a block device, I/O with pread/pwrite on one fd.

    Holes: ``block_status`` uses ``SEEK_DATA``/``SEEK_HOLE``; ``write_zeroes``
    punches a hole when allowed, else ``FALLOC_FL_ZERO_RANGE``, else writes
    zeros; ``trim`` punches a hole. The kernel page cache is shared by every
    connection, so multi-conn is safe and ``fdatasync`` covers all of them.
    """

    #: page-cache I/O of a few pages is faster than a thread hop; 64 KiB and more go
    #: to the pool so that one connection's 1 MiB requests do not hold up the loop
    #: for the others (measured with bench/bench_nbd.py, docs/NBD.md)
    inline_max = (64 << 10) - 1

    def __init__(self, path: str, *, read_only: bool = False, description: str = ""):
        self.path = path
        self.read_only = read_only
        self.description = description or path
        try:
            self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as err:
            raise BackendError(f"cannot open {path}: {err.strerror}", _nbd_errno(err)) from err
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        want = len(buf)
        got = os.preadv(self.fd, [buf], offset)
        while got < want:  # short read: rare (signals) or past EOF of a growing file
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n == 0:
                buf[got:] = bytes(want - got)
                return
            got += n

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        try:
            done = os.pwrite(self.fd, data, offset)
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
            if fua:
                os.fdatasync(self.fd)
        except OSError as err:
            raise BackendError(f"write failed: {err.strerror}", _nbd_errno(err)) from err

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        try:
            if may_trim and _fallocate(
                self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            ):
                pass
            elif not _fallocate(
                self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length
            ):
                self._write_zeros(offset, length)
            if fua:
                os.fdatasync(self.fd)
        except OSError as err:
            raise BackendError(f"write zeroes failed: {err.strerror}", _nbd_errno(err)) from err

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(offset, _ZERO_CHUNK[:n])
            offset += n

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if fua:
                os.fdatasync(self.fd)
        except OSError as err:
            raise BackendError(f"trim failed: {err.strerror}", _nbd_errno(err)) from err

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise BackendError(f"flush failed: {err.strerror}", _nbd_errno(err)) from err

    def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.is_block_device:
            return [(length, 0)]
        end = offset + length
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    data = end  # no data after pos: the rest is a hole
                if data > pos:
                    out.append((min(data, end) - pos, STATE_HOLE | STATE_ZERO))
                    pos = min(data, end)
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                out.append((min(hole, end) - pos, 0))
                pos = min(hole, end)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(length, 0)]
            raise BackendError(f"block status failed: {err.strerror}", errno.EIO) from err
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
