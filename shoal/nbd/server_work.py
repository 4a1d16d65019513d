"""Requests that leave the event loop's hands: thread-pool jobs and async-backend tasks.

The connection (``server_connection.py``) runs small requests of a blocking
backend inline; everything else becomes a :class:`Work`: a job in the server's
thread pool (:func:`run_blocking`) or a task on the loop (:func:`run_async`).
Both return the complete reply, in pieces, for the connection to send.

Whether a request has *started* matters to fencing: a pool job has started once
a worker thread picked it up (``concurrent.futures.Future.cancel`` decides that
atomically); a task has started once its coroutine took its first step
(:attr:`Work.started`, set on that step). A request that has not started can
be discarded and will never touch the backend.

Buffers. A pool job gets a buffer from :class:`BufferPool`, not a fresh
``bytearray``: on a 2-CPU host a fresh 1 MiB buffer filled by a worker thread
cost several times the ``pread`` itself (page faults and ``munmap`` across
threads; measured with bench/bench_nbd.py), which made the pool path lose
against qemu-nbd. Buffers are taken and given back on the loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass

from shoal.nbd import replies
from shoal.nbd.backend import AsyncBackend, Backend
from shoal.nbd.constants import EIO, Cmd, CmdFlag
from shoal.nbd.errors import BackendError
from shoal.nbd.requests import Request
from shoal.util.buffers import unzeroed

log = logging.getLogger("shoal.nbd.server")

# plain ints: ``int & IntFlag`` runs the enum's Python-level operator (a request's hot path)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_REQ_ONE = int(CmdFlag.REQ_ONE)

#: a complete reply, in pieces sent back to back
Reply = tuple[bytes | bytearray | memoryview, ...]


@dataclass(frozen=True)
class Framing:
    """What a connection negotiated that shapes its replies."""

    structured: bool
    context: int  # id of base:allocation, 0 if not selected


@dataclass(eq=False, slots=True)
class Work:
    """A request handed to the thread pool or run as a task."""

    req: Request
    nbytes: int  # counted against the connection's limit of bytes in flight
    pool: concurrent.futures.Future[Reply] | None = None  # a thread-pool job
    buf: bytearray | None = None  # from the BufferPool, given back when done
    started: bool = False  # a task's coroutine has taken its first step
    #: a READ the async backend started from the server's callback (``read_now``):
    #: the future's result is the data, not the reply
    now: bool = False

    def cancel_unstarted(self, future: asyncio.Future[Reply]) -> bool:
        """Cancel unless the backend call has begun; True if it never will."""
        if self.pool is not None:
            return self.pool.cancel()  # atomic against a worker picking it up
        if not self.started:
            # a task cancelled before its first step never runs a line of its coroutine
            return future.cancel()
        return False

    def cancel(self, future: asyncio.Future[Reply]) -> None:
        """Cancel whatever can be: a running thread cannot, a running task can."""
        if self.pool is not None:
            self.pool.cancel()
        else:
            future.cancel()


class BufferPool:
    """Reusable buffers for pool jobs, in power-of-two sizes from 64 KiB.

    Holds at most ``max_bytes`` of idle buffers; beyond that, given-back buffers
    are simply dropped. Loop thread only.
    """

    def __init__(self, max_bytes: int = 32 << 20):
        self.max_bytes = max_bytes
        self._idle: dict[int, list[bytearray]] = {}
        self._idle_bytes = 0

    def take(self, size: int) -> bytearray:
        capacity = 1 << max(16, (size - 1).bit_length())
        idle = self._idle.get(capacity)
        if idle:
            self._idle_bytes -= capacity
            return idle.pop()
        return unzeroed(capacity)  # a job writes what it uses: read_into or a payload copy

    def give(self, buf: bytearray) -> None:
        if self._idle_bytes + len(buf) <= self.max_bytes:
            self._idle.setdefault(len(buf), []).append(buf)
            self._idle_bytes += len(buf)


def run_blocking(
    backend: Backend, req: Request, payload: memoryview | bytes, buf: bytearray | None, f: Framing
) -> Reply:
    """One request of a blocking backend, in a pool thread; returns the complete reply."""
    fua = bool(req.flags & _FUA)
    cmd = req.cmd
    if cmd == Cmd.READ:
        data = memoryview(buf)[: req.length] if buf is not None else memoryview(bytearray(req.length))
        backend.read_into(req.offset, data)
        return (_read_header(req, f), data)
    if cmd == Cmd.WRITE:
        backend.write(req.offset, payload, fua=fua)
    elif cmd == Cmd.FLUSH:
        backend.flush()
    elif cmd == Cmd.TRIM:
        backend.trim(req.offset, req.length, fua=fua)
    elif cmd == Cmd.WRITE_ZEROES:
        backend.write_zeroes(
            req.offset, req.length, may_trim=not req.flags & _NO_HOLE, fua=fua
        )
    elif cmd == Cmd.BLOCK_STATUS:
        return (block_status_reply(req, backend.block_status(req.offset, req.length), f),)
    return (replies.simple_reply(req.cookie),)


async def run_async(backend: AsyncBackend, work: Work, payload: bytes, f: Framing) -> Reply:
    """One request of an async backend, as a task; returns the complete reply."""
    work.started = True  # from here on, a PREEMPT lets this request complete
    req = work.req
    fua = bool(req.flags & _FUA)
    cmd = req.cmd
    if cmd == Cmd.READ:
        return read_reply(req, await backend.read(req.offset, req.length), f)
    if cmd == Cmd.WRITE:
        await backend.write(req.offset, payload, fua=fua)
    elif cmd == Cmd.FLUSH:
        await backend.flush()
    elif cmd == Cmd.TRIM:
        await backend.trim(req.offset, req.length, fua=fua)
    elif cmd == Cmd.WRITE_ZEROES:
        await backend.write_zeroes(
            req.offset, req.length, may_trim=not req.flags & _NO_HOLE, fua=fua
        )
    elif cmd == Cmd.BLOCK_STATUS:
        return (block_status_reply(req, await backend.block_status(req.offset, req.length), f),)
    return (replies.simple_reply(req.cookie),)


def read_reply(req: Request, data: bytes, f: Framing) -> Reply:
    """The reply to a READ whose data an async backend returned."""
    if len(data) != req.length:
        raise BackendError(f"backend returned {len(data)} bytes for a read of {req.length}", EIO)
    return (_read_header(req, f), data)


def _read_header(req: Request, f: Framing) -> bytearray:
    header = bytearray(replies.DATA_HEADER if f.structured else replies.SIMPLE)
    replies.pack_read_header(header, req.cookie, req.offset, req.length, f.structured)
    return header


def block_status_reply(req: Request, extents: list[tuple[int, int]], f: Framing) -> bytes:
    extents = clip_extents(extents, req.length)
    if req.flags & _REQ_ONE:
        extents = extents[:1]
    return replies.block_status_chunk(req.cookie, f.context, extents)


def clip_extents(extents: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    total = 0
    for n, flags in extents:
        n = min(n, length - total)
        if n <= 0:
            break
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
        total += n
    return out or [(length, 0)]


def error_of(err: BaseException, peer: str) -> tuple[int, str]:
    """The NBD error value and message for a failed request (logged as one line)."""
    if isinstance(err, BackendError):
        log.warning("nbd %s: backend error: %s", peer, err)
        return err.errno, str(err)
    if isinstance(err, OSError):
        log.warning("nbd %s: I/O error: %s", peer, err)
        return EIO, err.strerror or "I/O error"
    log.error("nbd %s: unexpected %s: %s", peer, type(err).__name__, err)
    return EIO, "internal server error"


def cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"
