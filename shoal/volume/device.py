"""The LUN as seen by one process: a regular file or a block device.

Positional I/O only (``os.pread``/``os.pwrite``), so threads can share one descriptor.
``write_zeroes`` punches a hole in a file (``fallocate``) or asks a block device to zero
(``BLKZEROOUT``) and falls back to writing zeros. ``flush`` is ``fdatasync``, which on the
one descriptor makes data and metadata written before it durable together.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

from shoal.volume.errors import DeviceError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


class Device:
    """An open LUN. Thread-safe: every call is positional."""

    def __init__(self, path: str, *, writable: bool = True):
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError as err:
            raise DeviceError(f"{path} does not exist; give the path of a volume image or block device") from err
        except PermissionError as err:
            raise DeviceError(f"no permission to open {path}; run as root or fix its permissions") from err
        except OSError as err:
            raise DeviceError(f"cannot open {path}: {err.strerror}") from err
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise DeviceError(f"{path} is neither a regular file nor a block device")
        self._punch_ok = not self.is_block
        self._zeroout_ok = self.is_block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    # past the end of a file: what is not there reads as zeros
                    parts.append(bytes(length - got))
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as err:
            raise DeviceError(f"read of {length} bytes at offset {offset} of {self.path} failed: {err.strerror}") from err

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as err:
            raise DeviceError(f"write at offset {offset} of {self.path} failed: {err.strerror}") from err

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, cheaply where the device can."""
        if length <= 0:
            return
        if self._punch_ok:
            if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                err = ctypes.get_errno()
                raise DeviceError(f"zeroing {length} bytes at {offset} of {self.path} failed: {os.strerror(err)}")
            self._punch_ok = False
        if self._zeroout_ok:
            try:
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("<QQ", offset, length))
                return
            except OSError:
                self._zeroout_ok = False
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZERO_CHUNK))
            self.pwrite(offset, _ZERO_CHUNK[:n] if n < len(_ZERO_CHUNK) else _ZERO_CHUNK)
            offset += n

    def pwrite_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write and make this write durable before returning (the journal's commit)."""
        self.pwrite(offset, data)
        self.flush()

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise DeviceError(f"flush of {self.path} failed: {err.strerror}") from err
