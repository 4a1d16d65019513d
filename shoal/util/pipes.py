"""Data parked in a pipe between two sockets, moved with splice(2): no copy in user space.

A redirected 1 MiB block passes through the coordinator: a read from the storage
target's socket to the requesting node's channel socket, a write the other way.
Received into a buffer and sent from it, it is copied twice by the kernel on the way
(recv, send). Spliced, the kernel moves references to the socket buffers' pages into
a pipe and out again to the other socket: the coordinator copies nothing
(docs/ARCHITECTURE.md, "Copies on the way").

- :class:`PipePool` hands out pipes of ``PIPE_SIZE`` bytes and takes back empty ones
  (a pipe with bytes left in it is closed, never reused).
- :class:`Piped` is a payload that lives in such a pipe: ``length`` bytes, to be
  spliced to a socket by whoever holds it, who then calls ``release``.
- :class:`FdWaiter` waits until a transport's socket is readable or writable. The
  event loop refuses to watch a descriptor a transport owns, so it watches a
  duplicate (same socket), made on first use and closed with ``close``.
- :func:`send_head` sends the header that goes before spliced data, in the same
  segment as the data's start where it can; :func:`send_piped` sends both.
- :func:`drain_pipe` reads a payload out of its pipe, for a consumer that cannot splice.
- :func:`splice_in` moves what a socket received into a pipe.
- :func:`unread` is how many bytes a socket has received that nobody has read yet.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable
from typing import cast

#: F_SETPIPE_SZ (fcntl.F_SETPIPE_SZ from Python 3.10 on Linux; spelled out for mypy)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: the pipes' size: one redirected block of up to this many bytes fits whole
PIPE_SIZE = 1 << 20
#: pipes kept open for reuse (one per redirected read in flight; more are made as
#: needed). The kernel counts every pipe's size against its user (fs.pipe-user-pages-soft,
#: 64 MiB by default, all of the user's processes together; past it, no pipe is enlarged
#: and reads go without one), so few are kept.
POOL_KEEP = 16


class Piped:
    """``length`` bytes waiting in a pipe, whose read end is ``r``."""

    __slots__ = ("r", "w", "length", "_pool")

    def __init__(self, pool: PipePool, fds: tuple[int, int], length: int):
        self.r, self.w = fds
        self.length = length
        self._pool: PipePool | None = pool

    def __len__(self) -> int:
        return self.length

    def release(self, emptied: bool) -> None:
        """Done with it: ``emptied`` if every byte was spliced out (the pipe is reused)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.give((self.r, self.w), emptied)


class PipePool:
    """Pipes of ``size`` bytes (as large as the system allows, up to that)."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = POOL_KEEP):
        self.size = size
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int] | None:
        """An empty pipe of ``size`` bytes, non-blocking at both ends; None if the
        system gives none that large (the caller then goes without)."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            got = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:  # EPERM: over the user's pipe budget, or above pipe-max-size
            got = 0
        if got < self.size:
            os.close(r)
            os.close(w)
            return None
        return r, w

    def give(self, fds: tuple[int, int], emptied: bool) -> None:
        if emptied and len(self._free) < self.keep:
            self._free.append(fds)
            return
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        while self._free:
            for fd in self._free.pop():
                os.close(fd)


#: the process's pool (the event loop thread uses it; pipes are not tied to a loop)
POOL = PipePool()


async def send_piped(transport: asyncio.WriteTransport, waiter: FdWaiter, head: bytes, payload: Piped) -> None:
    """Send ``head`` (:func:`send_head`), then all of ``payload`` spliced from its pipe to
    the socket, waiting while the socket is full. Raises what the waiter's :meth:`fail`
    was given, or ConnectionResetError if the pipe holds less than it should. The
    caller still owns ``payload``."""
    await send_head(transport, waiter, head)
    fd = waiter.sock.fileno()  # the duplicate: the transport's own may be closed already
    left = len(payload)
    while left:
        if waiter.failure is not None:
            raise waiter.failure
        try:
            n = os.splice(payload.r, fd, left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if not unread(payload.r):  # (the pipe is empty, not the socket full)
                raise ConnectionResetError("a pipe ran dry before its payload was sent") from None
            await waiter.writable()
            continue
        if n == 0:
            raise ConnectionResetError("a pipe ran dry before its payload was sent")
        left -= n


async def send_head(transport: asyncio.WriteTransport, waiter: FdWaiter, head: bytes) -> None:
    """Send ``head`` ahead of data (at least a byte: MSG_MORE holds the head back until
    more comes) about to be spliced to the same socket, and return
    once it has gone. When the transport holds nothing unsent, straight on the socket
    with MSG_MORE: the kernel sends it with the start of the data, in one segment (one
    wakeup of the peer, not two); else, and for what the socket did not take, through
    the transport, waiting until it has sent everything."""
    sent = 0
    if not transport.get_write_buffer_size():
        try:
            sent = waiter.sock.send(head, socket.MSG_MORE)
        except (BlockingIOError, InterruptedError):
            sent = 0
    if sent < len(head):
        transport.write(head[sent:])
    while transport.get_write_buffer_size():
        await waiter.writable()


def drain_pipe(payload: Piped) -> bytes:
    """All of ``payload``'s bytes, read out of its pipe (which is then released): for a
    consumer that cannot splice. OSError if the pipe holds fewer than it should."""
    buf = bytearray(len(payload))
    view, pos = memoryview(buf), 0
    try:
        while pos < len(buf):
            n = os.readv(payload.r, [view[pos:]])
            if n <= 0:
                raise OSError(f"a pipe held {pos} bytes, not {len(buf)}")
            pos += n
    except BlockingIOError:
        raise OSError(f"a pipe held {pos} bytes, not {len(buf)}") from None
    finally:
        payload.release(emptied=pos == len(buf))
    return cast(bytes, buf)  # a bytearray reads like bytes to every user of a payload


#: why :func:`splice_in` stopped
FILLED, WAIT, FULL, EOF = "filled", "wait", "full", "eof"


def splice_in(fd: int, pipe_w: int, left: int) -> tuple[int, str]:
    """Splice up to ``left`` bytes from socket ``fd`` into a pipe while they come.
    Returns (bytes moved, why it stopped): FILLED (all ``left``), WAIT (the socket has
    no more now), FULL (the socket has more but the pipe takes no more: its buffers
    fill by the socket's pieces, not by bytes) or EOF (the peer closed). OSError: the
    connection failed."""
    moved, stuck = 0, False
    while moved < left:
        try:
            n = os.splice(fd, pipe_w, left - moved, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if not unread(fd):
                return moved, WAIT
            if stuck:
                return moved, FULL
            stuck = True  # it may have arrived since: once more
            continue
        if n == 0:
            return moved, EOF
        moved += n
        stuck = False
    return moved, FILLED


def unread(fd: int) -> int:
    """Bytes received on socket ``fd`` and not read yet (FIONREAD)."""
    (n,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))
    return int(n)


class FdWaiter:
    """Waits for a transport's socket ``fd`` through a duplicate descriptor."""

    def __init__(self, fd: int):
        self.fd = fd
        self._sock: socket.socket | None = None
        self._waiting: asyncio.Future[None] | None = None
        #: what :meth:`fail` was given: the connection is lost
        self.failure: BaseException | None = None

    @property
    def sock(self) -> socket.socket:
        """The socket, as a socket object of its own (a duplicate of ``fd``)."""
        if self._sock is None:
            self._sock = socket.socket(fileno=os.dup(self.fd))
        return self._sock

    def when_readable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) each time the socket is readable, until
        :meth:`stop_reading`."""
        asyncio.get_running_loop().add_reader(self.sock.fileno(), callback)

    def stop_reading(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())

    async def writable(self) -> None:
        """Return once the socket takes more bytes; raises what :meth:`fail` is given."""
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        fut = self._waiting = loop.create_future()
        fd = self.sock.fileno()
        loop.add_writer(fd, _done, fut)
        try:
            await fut
        finally:
            self._waiting = None
            loop.remove_writer(fd)

    def fail(self, err: BaseException) -> None:
        """Wake a waiter with ``err`` (the connection was lost); later waits raise it too."""
        if self.failure is None:
            self.failure = err
        fut = self._waiting
        if fut is not None and not fut.done():
            fut.set_exception(err)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            except RuntimeError:  # no running loop: nothing is registered any more
                pass
            sock.close()


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
