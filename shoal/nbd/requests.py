"""Transmission-phase requests, server side, without I/O.

A request is 28 bytes (``wire.REQUEST``), followed by ``length`` bytes of
payload for NBD_CMD_WRITE only. :func:`parse_request` reads one from a
buffer the adapter owns, without copying: the payload is a memoryview into
that buffer. :class:`RequestChecker` decides, from the negotiated state
alone, which error a well-formed request gets before any backend sees it.

Who is at fault:

- a bad magic, or a WRITE whose payload exceeds the maximum block size (we
  will not buffer it) leaves the stream unusable: :class:`RemoteProtocolError`
  and a hard disconnect, which the spec allows for a breach of a MUST;
- everything else (unknown command or flag, past the end, misaligned, too
  large a READ, FLUSH with a length) is answered with an error value and the
  connection goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from shoal.nbd import wire
from shoal.nbd.constants import (
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    TxFlag,
)
from shoal.nbd.errors import RemoteProtocolError

HEADER = wire.REQUEST.size
_unpack = wire.REQUEST.unpack_from
_WRITE = int(Cmd.WRITE)  # a plain int: an enum's attribute lookup costs on every request


class Request(NamedTuple):
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def parse_request(
    buf: memoryview | bytes, start: int, end: int, max_payload: int
) -> tuple[Request | None, int]:
    """Parse one request at ``buf[start:end]``.

    Returns ``(request, next_start)``; ``(None, needed)`` when more bytes are
    needed, where ``needed`` is the total size of the message that starts at
    ``start``. The payload of a WRITE is ``buf[next_start - length:next_start]``.
    """
    if end - start < HEADER:
        return None, HEADER
    magic, flags, cmd, cookie, offset, length = _unpack(buf, start)
    if magic != REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad request magic {magic:#x}")
    total = HEADER
    if cmd == _WRITE:
        if length > max_payload:
            raise RemoteProtocolError(
                f"write of {length} bytes exceeds the maximum block size {max_payload}"
            )
        total += length
        if end - start < total:
            return None, total
    return Request(flags, cmd, cookie, offset, length), start + total


# flags each command accepts (FUA is valid on every command once advertised);
# plain ints: ``~`` of an IntFlag would only cover the defined bits
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: int(CmdFlag.FUA | CmdFlag.DF),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.DISC: int(CmdFlag.FUA),
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
}
_WRITING = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_DF = int(CmdFlag.DF)


@dataclass(frozen=True)
class RequestChecker:
    """Validation of one connection's requests against what was negotiated."""

    size: int
    flags: TxFlag
    structured: bool
    allocation_context: int | None
    minimum: int
    maximum: int

    def check(self, req: Request) -> tuple[int, str]:
        """``(0, "")`` if the request may run, else ``(error, message)``."""
        cmd = req.cmd
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None or not self._advertised(cmd):
            return EINVAL, f"command {cmd} is not supported"
        if req.flags & ~allowed:
            return EINVAL, f"flags {req.flags:#x} are not valid for {Cmd(cmd).name}"
        if req.flags & _DF and not self.structured:
            return EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
        if cmd == Cmd.FLUSH or cmd == Cmd.DISC:
            if req.offset or req.length:
                return EINVAL, f"{Cmd(cmd).name} must have zero offset and length"
            return 0, ""
        if cmd in _WRITING and self.flags & TxFlag.READ_ONLY:
            return EPERM, "the export is read-only"
        if cmd == Cmd.BLOCK_STATUS and self.allocation_context is None:
            return EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return EINVAL, "zero-length request"
        if req.length > self.maximum and cmd == Cmd.READ:
            return (EOVERFLOW if self.structured else EINVAL), (
                f"read of {req.length} bytes exceeds the maximum block size {self.maximum}"
            )
        if req.offset + req.length > self.size:
            error = ENOSPC if cmd in _WRITING else EINVAL
            return (
                error,
                f"request [{req.offset}, +{req.length}) is past the end ({self.size} bytes)",
            )
        if (req.offset | req.length) % self.minimum and cmd in (Cmd.READ, Cmd.WRITE):
            return EINVAL, f"request is not aligned to the minimum block size {self.minimum}"
        return 0, ""

    def _advertised(self, cmd: int) -> bool:
        if cmd == Cmd.FLUSH:
            return bool(self.flags & TxFlag.SEND_FLUSH)
        if cmd == Cmd.TRIM:
            return bool(self.flags & TxFlag.SEND_TRIM)
        if cmd == Cmd.WRITE_ZEROES:
            return bool(self.flags & TxFlag.SEND_WRITE_ZEROES)
        return True
