"""Authenticated request/response channel between node agents (asyncio TCP).

Connection = handshake (mutual HMAC challenge, see ``protocol``) + frames.
A request frame header is ``{"id", "op", "args"}``; the answer is
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error"}``; either may
carry a binary payload (block I/O arrives with the redirected data path).
A connection carries one request at a time; callers that need concurrency
open several or wait on the lock.

Layers, bottom up:

- :class:`FrameReceiver` (no I/O) says where the next received bytes go and
  turns them into frames. Sizes and JSON headers, and frames that arrive
  whole, land in one reusable scratch buffer (``SCRATCH_SIZE``). A payload
  that does not end inside it gets a ``bytearray`` of its own that the kernel
  fills in place, and that bytearray is the payload the reader gets: a 1 MiB
  redirected block costs at most one copy of the part that arrived with its
  header, not a copy of the whole block per layer. A payload its ``wants_pipe``
  chooses is not received into a buffer: parsing stops there (``pipe_due``),
  and the stream writes the part that came with the header into a pipe and
  splices the rest from the socket after it.
- :class:`FrameStream`, an :class:`asyncio.BufferedProtocol`, is the thin
  adapter: ``read_frame()`` waits for the next frame; ``write_frame()`` then
  ``drain()`` sends one, waiting while the transport is over its high-water
  mark (pause_writing/resume_writing), so a peer that stops reading holds us
  at what the transport buffers. Reading pauses only while more than
  ``QUEUE_LIMIT`` bytes of frames wait unread (a peer that does not keep to
  one request at a time). EOF or a lost connection (ConnectionResetError
  "peer closed the connection", after the frames that arrived before it), a
  frame over the size limits (``RemoteProtocolError``; the connection is
  closed) or our own ``close()`` end the stream; a waiting reader or writer
  gets that error at once. A payload due for a pipe is spliced from the socket
  with reading paused (``_pipe_in``); when the pipe fills up before it has all
  come, what it holds is read back and the rest is received into a buffer.
- :class:`ChannelServer` and :class:`Connection`: the handshake and the
  request/answer loop.

Payloads handed to the handler and returned by ``call`` are ``bytes`` or, when
received in place, a ``bytearray``; or, for the requests a server's
``pipe_payload`` chooses, a ``Piped`` (released by the server after the handler). Payloads we send go to the transport as they
are, with their frame's head in the same send (``util.transports``); uvloop keeps
a view of what it could not send yet, so a caller must not change a payload after
passing it here.

This module takes no timeouts of its own except where it must bound a
handshake with a stranger; callers wrap calls in ``asyncio.timeout()``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from shoal.netft.errors import (
    AuthenticationFailed,
    NetftError,
    RemoteError,
    RemoteProtocolError,
)
from shoal.netft.protocol import (
    FRAME_HEADER_SIZE,
    check_proof,
    decode_frame_sizes,
    decode_header,
    encode_frame,
    encode_frame_head,
    parse_nonce,
    proof,
)
from shoal.util.buffers import unzeroed
from shoal.util.pipes import (
    EOF,
    FULL,
    POOL,
    WAIT,
    FdWaiter,
    Piped,
    drain_pipe,
    send_piped,
    splice_in,
)
from shoal.util.transports import write_together

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
#: headers and small frames are received into one reusable buffer this large
SCRATCH_SIZE = 64 << 10
#: when less than this is free at the end of the scratch buffer, the partial frame
#: at its start is moved to the front
_SCRATCH_MIN_FREE = 4 << 10
#: bytes of received frames nobody has read yet before we stop reading (one request at
#: a time is the rule; this only bounds a peer that breaks it)
QUEUE_LIMIT = 8 << 20
#: a payload at least this large is handed to the transport as it is, not joined to its head
_SEND_AS_IS = 64 << 10
#: the largest frame either side accepts before the peer has proved it holds the secret
#: (handshake frames are a small JSON header; no stranger makes us allocate more)
HANDSHAKE_FRAME_MAX = 4096

#: a frame's header and payload: bytes (a bytearray when received in place), or, for a
#: stream whose receiver ``wants_pipe`` it, the payload waiting in a pipe
Frame = tuple[dict[str, Any], "bytes | Piped"]
#: a handler is given a request's payload (bytes, or a pipe as its server's
#: ``pipe_payload`` chose; the server releases it after the handler returned, so a
#: handler that splices all of it out releases it itself, as emptied) and answers with
#: a result and a payload: bytes, or data waiting in a pipe, which is spliced to the
#: socket and released
Handler = Callable[[str, str, dict[str, Any], "bytes | Piped"], Awaitable[tuple[Any, "bytes | Piped"]]]


@dataclass(slots=True)
class PipeDue:
    """A frame whose payload is to go into a pipe: its header, and the start of the
    payload that arrived with it."""

    header: dict[str, Any]
    hlen: int
    plen: int
    arrived: bytes


class FrameReceiver:
    """Frames out of a byte stream, received in place; no sockets.

    Feed it as asyncio feeds a BufferedProtocol: receive into ``get_buffer()``,
    then call ``buffer_updated(n)``; take complete frames with ``pop()``.
    ``buffer_updated`` raises :class:`RemoteProtocolError` for a frame over the
    size limits of ``protocol.decode_frame_sizes`` or a header that is not a
    JSON object; the receiver is of no further use then.

    Invariant: while a part (a payload, or a header too large for the scratch
    buffer) is received in place, the scratch buffer holds nothing unread; so
    ``get_buffer`` offers no more of the part's buffer than the part has left,
    and the next frame starts in the scratch buffer again.
    """

    def __init__(self, scratch_size: int = SCRATCH_SIZE):
        self._rx = bytearray(scratch_size)
        self._rxv = memoryview(self._rx)
        self._start = 0  # first unread byte in the scratch buffer
        self._end = 0  # end of the received bytes in it
        # the part received in place and how much of it has arrived; it is the payload
        # of the frame whose header is ``_part_header``, or (that is None) the header
        # of a frame whose payload is ``_part_plen`` bytes
        self._part: bytearray | None = None
        self._partv: memoryview | None = None
        self._filled = 0
        self._part_header: dict[str, Any] | None = None
        self._part_hlen = 0
        self._part_plen = 0
        self._frames: collections.deque[tuple[dict[str, Any], bytes, int]] = collections.deque()
        #: wire bytes of the complete frames not taken yet
        self.queued_bytes = 0
        #: a lower limit than the protocol's for a frame's header + payload (the handshake's)
        self.max_frame: int | None = None
        #: says, from a frame's header and payload size, whether the payload should go
        #: into a pipe instead of a buffer (None: never). When it does, parsing stops at
        #: the payload with ``pipe_due`` set, and whoever reads the socket moves the
        #: payload into a pipe and ends it with :meth:`piped` or :meth:`not_piped`.
        self.wants_pipe: Callable[[dict[str, Any], int], bool] | None = None
        self.pipe_due: PipeDue | None = None

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._partv is not None:
            return self._partv[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._rx) - self._end < _SCRATCH_MIN_FREE:
            # unread is the start of one frame whose sizes and header fit: move it to the front
            pending = bytes(self._rxv[self._start : self._end])
            self._rxv[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        return self._rxv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self.pipe_due is None, "bytes received while a payload waits to go into a pipe"
        if self._part is None:
            self._end += nbytes
            self._parse()
            return
        self._filled += nbytes
        if self._filled == len(self._part):
            self._part_done()

    def has_frames(self) -> bool:
        return bool(self._frames)

    def pop(self) -> Frame:
        """The oldest complete frame (IndexError if there is none)."""
        header, payload, size = self._frames.popleft()
        self.queued_bytes -= size
        return header, payload

    def _parse(self) -> None:
        rx = self._rxv
        while self._end - self._start >= FRAME_HEADER_SIZE:
            hstart = self._start + FRAME_HEADER_SIZE
            hlen, plen = decode_frame_sizes(bytes(rx[self._start : hstart]))
            if self.max_frame is not None and hlen + plen > self.max_frame:
                raise RemoteProtocolError(
                    f"peer sent a frame of {hlen}+{plen} bytes during the handshake (at most {self.max_frame})")
            pstart = hstart + hlen
            if pstart > self._end:
                if FRAME_HEADER_SIZE + hlen > len(self._rx):
                    self._part_plen = plen
                    arrived = bytes(rx[hstart : self._end])
                    self._start = self._end
                    self._begin_part(None, hlen, hlen, arrived)
                return  # else the header arrives in the scratch buffer
            header = decode_header(bytes(rx[hstart:pstart]))
            if pstart + plen > self._end:
                arrived = bytes(rx[pstart : self._end])
                self._start = self._end
                if self.wants_pipe is not None and self.wants_pipe(header, plen):
                    self.pipe_due = PipeDue(header, hlen, plen, arrived)
                else:
                    self._begin_part(header, hlen, plen, arrived)
                return
            self._start = pstart + plen
            self._emit(header, bytes(rx[pstart : self._start]) if plen else b"", hlen)

    def _begin_part(self, header: dict[str, Any] | None, hlen: int, size: int, arrived: bytes | bytearray) -> None:
        """Receive the next ``size`` bytes in place, ``arrived`` (fewer) being their
        start: the payload of the frame whose header is ``header``, or (None) a header
        too large for the scratch buffer."""
        part = unzeroed(size)  # every byte is received before the frame is emitted
        part[: len(arrived)] = arrived
        self._part_header, self._part_hlen = header, hlen
        self._part, self._partv, self._filled = part, memoryview(part), len(arrived)

    def piped(self, payload: object) -> None:
        """The payload ``pipe_due`` announced is in a pipe (``payload``): the frame is
        complete; parsing goes on."""
        due = self.pipe_due
        assert due is not None
        self.pipe_due = None
        self._emit(due.header, cast(bytes, payload), due.hlen)

    def not_piped(self, arrived: bytes | bytearray) -> None:
        """The payload ``pipe_due`` announced goes into a buffer after all; ``arrived``
        is its start, as far as it has come."""
        due = self.pipe_due
        assert due is not None
        self.pipe_due = None
        if len(arrived) == due.plen:
            self._emit(due.header, bytes(arrived), due.hlen)
        else:
            self._begin_part(due.header, due.hlen, due.plen, arrived)

    def _part_done(self) -> None:
        part = self._part
        assert part is not None
        # the reader gets the bytearray: keep no view of it (a view would pin its size)
        self._part = self._partv = None
        header = self._part_header
        if header is None:  # it was a large header
            header = decode_header(bytes(part))
            if self._part_plen:
                self._begin_part(header, self._part_hlen, self._part_plen, b"")
            else:
                self._emit(header, b"", self._part_hlen)
            return
        self._part_header = None
        # a bytearray reads like bytes to every user of a payload
        self._emit(header, cast(bytes, part), self._part_hlen)

    def discard(self) -> None:
        """Drop the frames nobody took (the stream ended); a payload waiting in a pipe
        is released."""
        while self._frames:
            payload = self._frames.popleft()[1]
            if isinstance(payload, Piped):
                payload.release(emptied=False)
        self.queued_bytes = 0

    def _emit(self, header: dict[str, Any], payload: bytes, hlen: int) -> None:
        size = FRAME_HEADER_SIZE + hlen + len(payload)
        self._frames.append((header, payload, size))
        self.queued_bytes += size


class FrameStream(asyncio.BufferedProtocol):
    """One TCP connection carrying frames, for one reader and one writer at a time."""

    def __init__(self, on_connected: Callable[[FrameStream], None] | None = None):
        self.transport: asyncio.Transport | None = None
        self.receiver = FrameReceiver()
        self._on_connected = on_connected
        #: why no more frames will come (EOF, lost, closed here, a protocol violation)
        self._error: Exception | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._waiter: FdWaiter | None = None  # for spliced payloads (write_piped, _pipe_in)
        self._piping: _PipeIn | None = None  # a payload on its way from the socket into a pipe
        self.loop = asyncio.get_running_loop()  # (looked up once: it costs a getpid())
        self._lost: asyncio.Future[None] = self.loop.create_future()
        #: takes the next frame from the receive callback instead of a reader (set by
        #: Connection.start_call); called with the error instead if the stream ends first
        self.on_frame: Callable[[Frame | None, Exception | None], None] | None = None

    # --- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.receiver.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        receiver = self.receiver
        try:
            receiver.buffer_updated(nbytes)
        except RemoteProtocolError as err:
            self._fail(err)
            self._close_transport()
            return
        if receiver.pipe_due is not None:
            self._pipe_in()
        self._frames_arrived()

    def _frames_arrived(self) -> None:
        receiver = self.receiver
        if receiver.has_frames():
            take = self.on_frame
            if take is not None:
                self.on_frame = None
                take(receiver.pop(), None)
                return
            _wake(self._reader)
            if receiver.queued_bytes > QUEUE_LIMIT and not self._reading_paused and self.transport:
                self._reading_paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("peer closed the connection"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionResetError("peer closed the connection")
        err.__cause__ = exc
        self._fail(err)
        self._drop_pipe_in()
        self.receiver.discard()
        if self._waiter is not None:
            self._waiter.close()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._writer)

    # --- for the reader and the writer ---------------------------------------

    @property
    def closing(self) -> bool:
        return self._error is not None or self.transport is None or self.transport.is_closing()

    def peer_host(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    async def read_frame(self) -> Frame:
        """The next frame; ConnectionResetError once the peer closed, RemoteProtocolError
        for a frame over the limits (the connection is then closed)."""
        receiver = self.receiver
        while not receiver.has_frames():
            if self._error is not None:
                raise self._error
            assert self._reader is None, "one reader at a time"
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        frame = receiver.pop()
        if (self._reading_paused and receiver.queued_bytes <= QUEUE_LIMIT and self.transport
                and self._piping is None and receiver.pipe_due is None):
            self._reading_paused = False
            self.transport.resume_reading()
        return frame

    def write_frame(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send one frame; a large payload goes to the transport as it is (do not change it after)."""
        transport = self._open_transport()
        if len(payload) < _SEND_AS_IS:
            transport.write(encode_frame(header, payload))
        else:
            write_together(transport, (encode_frame_head(header, len(payload)), payload))

    def _open_transport(self) -> asyncio.Transport:
        """The transport, to write to; what ended the stream if it has ended."""
        if self._error is not None:
            raise self._error
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        return self.transport

    async def drain(self) -> None:
        """Return once the transport is under its high-water mark again."""
        while True:
            if self._error is not None:
                raise self._error
            if not self._writing_paused:
                return
            assert self._writer is None, "one writer at a time"
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None

    def close(self) -> None:
        """Close the connection (after what we wrote is sent); waiters get ConnectionResetError."""
        self._fail(ConnectionResetError("the connection was closed"))
        self._drop_pipe_in()
        self._close_transport()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fd_waiter(self, transport: asyncio.Transport) -> FdWaiter | None:
        if self._waiter is None:
            sock = transport.get_extra_info("socket")
            if sock is None:
                return None
            self._waiter = FdWaiter(sock.fileno())
        return self._waiter

    # --- a payload received into a pipe (FrameReceiver.wants_pipe) ---------------

    def _pipe_in(self) -> None:
        """Move the payload the receiver announced from the socket into a pipe with
        splice(2), reading paused meanwhile; or, with no pipe to be had, let the
        receiver take it into a buffer as usual."""
        receiver, transport = self.receiver, self.transport
        due = receiver.pipe_due
        assert due is not None
        fds = None
        try:
            waiter = self._fd_waiter(transport) if transport is not None else None
            fds = POOL.take() if waiter is not None and due.plen <= POOL.size else None
            # what arrived with the header first (less than the scratch buffer), into an empty pipe
            ok = fds is not None and (not due.arrived or os.write(fds[1], due.arrived) == len(due.arrived))
        except OSError:  # no descriptor to be had (EMFILE): into a buffer
            waiter, ok = None, False
        if not ok or transport is None or waiter is None:
            if fds is not None:
                POOL.give(fds, emptied=False)
            receiver.not_piped(due.arrived)
            return
        assert fds is not None
        self._piping = _PipeIn(fds, due.plen, due.plen - len(due.arrived))
        transport.pause_reading()
        self._pipe_more()

    def _pipe_more(self) -> None:
        p, waiter = self._piping, self._waiter
        if p is None or waiter is None:
            return
        # the duplicate descriptor: the transport's own may be closed (and its number
        # reused) before connection_lost tells us
        try:
            n, state = splice_in(waiter.sock.fileno(), p.fds[1], p.left)
        except OSError as err:
            self._pipe_broken(f"the connection failed in the middle of a frame: {err}")
            return
        p.left -= n
        if state == WAIT:
            if not p.watching:
                try:
                    waiter.when_readable(self._pipe_more)
                except OSError as err:  # no descriptor to be had (EMFILE)
                    self._pipe_broken(f"cannot wait for the rest of a frame: {err}")
                    return
                p.watching = True
            return
        if state == FULL:  # the data is there but the pipe takes no more
            self._pipe_full(p)
            return
        if state == EOF:
            self._pipe_broken("peer closed the connection in the middle of a frame")
            return
        self._end_pipe_in()
        self.receiver.piped(Piped(POOL, p.fds, p.plen))
        self._pipe_done()

    def _pipe_full(self, p: _PipeIn) -> None:
        """Back to receiving into a buffer: what is in the pipe goes there first."""
        self._end_pipe_in()
        have = p.plen - p.left
        buf = bytearray(have)
        view, pos = memoryview(buf), 0
        try:
            while pos < have:
                pos += os.readv(p.fds[0], [view[pos:]])
        except OSError as err:
            POOL.give(p.fds, emptied=False)
            self._pipe_broken(f"could not read back a payload from its pipe: {err}")
            return
        POOL.give(p.fds, emptied=True)
        self.receiver.not_piped(buf)
        self._pipe_done()

    def _pipe_broken(self, why: str) -> None:
        self._drop_pipe_in()
        self._fail(ConnectionResetError(why))
        self._close_transport()

    def _pipe_done(self) -> None:
        self._frames_arrived()
        if self.transport is not None and not self.transport.is_closing() and not self._reading_paused:
            self.transport.resume_reading()

    def _end_pipe_in(self) -> None:
        p, self._piping = self._piping, None
        if p is not None and p.watching and self._waiter is not None:
            self._waiter.stop_reading()

    def _drop_pipe_in(self) -> None:
        p = self._piping
        self._end_pipe_in()
        if p is not None:
            POOL.give(p.fds, emptied=False)

    # --- a payload sent from a pipe ----------------------------------------------

    async def write_piped(self, header: dict[str, Any], payload: Piped) -> None:
        """Send one frame whose payload waits in a pipe: the head (``send_head``), then
        the payload spliced from the pipe to the socket (no copy).
        The caller still owns ``payload`` (and releases it); no other frame may be
        written until this returns."""
        transport = self._open_transport()
        waiter = self._fd_waiter(transport)
        if waiter is None:
            raise ConnectionResetError("the connection has no socket to splice to")
        await send_piped(transport, waiter, encode_frame_head(header, len(payload)), payload)

    def _fail(self, err: Exception) -> None:
        if self._error is None:
            self._error = err
        take, self.on_frame = self.on_frame, None
        if take is not None:
            self.loop.call_soon(take, None, self._error)
        _wake(self._reader)
        _wake(self._writer)
        if self._waiter is not None:
            self._waiter.fail(err)


#: where Connection.start_call's answer goes: (result, payload, None) or (None, None, error)
Answered = Callable[[Any, "bytes | None", "BaseException | None"], None]


def _answer(then: Answered, result: Any, data: bytes | None, err: BaseException | None) -> None:
    try:
        then(result, data, err)
    except Exception:  # a bug in the callback: the stream goes on
        log.exception("a callback for an answer failed")


@dataclass(slots=True)
class _PipeIn:
    """A payload on its way from the socket into a pipe."""

    fds: tuple[int, int]
    plen: int
    left: int  # bytes still to splice
    watching: bool = False  # waiting for the socket to be readable


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class ChannelServer:
    """Accepts agents that prove they hold the cluster secret; refuses and logs others."""

    def __init__(self, cluster: str, node: str, key: bytes, handler: Handler,
                 pipe_payload: Callable[[dict[str, Any], int], bool] | None = None):
        """``pipe_payload(header, size)``: whether a request's payload is received into a
        pipe for the handler to splice on (``FrameReceiver.wants_pipe``)."""
        self.cluster = cluster
        self.node = node
        self.key = key
        self.handler = handler
        self.pipe_payload = pipe_payload
        self.servers: dict[str, asyncio.Server] = {}
        self.refusals = 0
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection

    async def listen(self, network: str, address: str, port: int) -> None:
        if network in self.servers:
            return
        self.servers[network] = await asyncio.get_running_loop().create_server(
            lambda: FrameStream(lambda stream: self._accept(network, stream)),
            address, port, reuse_address=True,
        )

    def close(self, network: str | None = None) -> None:
        for net in [network] if network else list(self.servers):
            srv = self.servers.pop(net, None)
            if srv is not None:
                srv.close()

    def _accept(self, network: str, stream: FrameStream) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(network, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, network: str, stream: FrameStream) -> None:
        source = stream.peer_host()
        try:
            stream.receiver.max_frame = HANDSHAKE_FRAME_MAX
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                peer = await self._handshake(network, source, stream)
            if peer is None:
                return
            stream.receiver.max_frame = None
            stream.receiver.wants_pipe = self.pipe_payload
            while True:
                header, payload = await stream.read_frame()
                result_payload: bytes | Piped = b""
                try:
                    result, result_payload = await self.handler(
                        peer, str(header.get("op")), dict(header.get("args") or {}), payload
                    )
                    answer: dict[str, Any] = {"id": header.get("id"), "ok": True, "result": result}
                except NetftError as err:
                    answer = {"id": header.get("id"), "ok": False, "error": str(err)}
                except Exception as err:  # a bug on our side: tell the peer, keep serving
                    log.exception("request %s from %s failed", header.get("op"), peer)
                    answer = {"id": header.get("id"), "ok": False, "error": f"internal error: {err}"}
                finally:
                    if isinstance(payload, Piped):
                        payload.release(emptied=False)  # unless the handler did, emptied
                if isinstance(result_payload, Piped):
                    await self._write_piped(stream, answer, result_payload)
                else:
                    stream.write_frame(answer, result_payload)
                await stream.drain()
        except (OSError, TimeoutError, RemoteProtocolError):
            pass
        finally:
            stream.close()
            await stream.wait_closed()

    @staticmethod
    async def _write_piped(stream: FrameStream, answer: dict[str, Any], payload: Piped) -> None:
        emptied = False
        try:
            await stream.write_piped(answer, payload)
            emptied = True
        finally:
            payload.release(emptied)

    async def _handshake(self, network: str, source: str, stream: FrameStream) -> str | None:
        s_nonce = os.urandom(16)
        stream.write_frame({"hello": "shoal/1", "cluster": self.cluster, "node": self.node,
                            "nonce": s_nonce.hex()})
        await stream.drain()
        msg, _ = await stream.read_frame()
        peer = str(msg.get("node", "?"))
        try:
            c_nonce = parse_nonce(msg.get("nonce"))
        except RemoteProtocolError:
            c_nonce = b""
        expected = proof(self.key, "client", self.cluster, s_nonce, c_nonce, peer)
        if not c_nonce or not check_proof(expected, msg.get("proof")):
            self.refusals += 1
            log.warning(
                "refused agent connection on %s from %s claiming to be %s: it does not prove "
                "it holds the secret of cluster %s",
                network, source, peer, self.cluster,
            )
            stream.write_frame({"ok": False, "error": f"{self.node} refused {peer}: wrong cluster secret "
                                f"(not the secret of cluster {self.cluster})"})
            await stream.drain()
            return None
        stream.write_frame({"ok": True, "proof": proof(self.key, "server", self.cluster, s_nonce,
                                                       c_nonce, self.node)})
        await stream.drain()
        return peer


class Connection:
    """Client side of one authenticated connection to one peer on one network."""

    def __init__(self, peer: str, network: str, stream: FrameStream):
        self.peer = peer
        self.network = network
        self.stream = stream
        self.lock = asyncio.Lock()
        self.next_id = 0
        self.broken = False
        #: done when the call start_call sent has its answer (call() waits for it)
        self._started: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls, cluster: str, node: str, key: bytes, peer: str, network: str, address: str, port: int
    ) -> Connection:
        _, stream = await asyncio.get_running_loop().create_connection(FrameStream, address, port)
        stream.receiver.max_frame = HANDSHAKE_FRAME_MAX
        try:
            hello, _ = await stream.read_frame()
            if hello.get("hello") != "shoal/1":
                raise RemoteProtocolError(f"{address}:{port} does not speak the shoal agent protocol")
            if hello.get("cluster") != cluster or hello.get("node") != peer:
                raise AuthenticationFailed(
                    f"{address}:{port} is {hello.get('node')!r} of cluster {hello.get('cluster')!r}, "
                    f"not {peer!r} of {cluster!r}; check the addresses in the configuration"
                )
            s_nonce = parse_nonce(hello.get("nonce"))
            c_nonce = os.urandom(16)
            stream.write_frame({"node": node, "nonce": c_nonce.hex(),
                                "proof": proof(key, "client", cluster, s_nonce, c_nonce, node)})
            await stream.drain()
            answer, _ = await stream.read_frame()
            if not answer.get("ok"):
                raise AuthenticationFailed(
                    f"{answer.get('error', 'refused')}; this node's cluster secret differs from {peer}'s"
                )
            if not check_proof(proof(key, "server", cluster, s_nonce, c_nonce, peer), answer.get("proof")):
                raise AuthenticationFailed(
                    f"{peer} at {address} could not prove it holds the cluster secret; refusing it"
                )
        except BaseException:
            stream.close()
            raise
        stream.receiver.max_frame = None
        return cls(peer, network, stream)

    @property
    def closed(self) -> bool:
        """Broken (a call was cut off or the peer broke the protocol) or closed: do not reuse."""
        return self.broken or self.stream.closing

    async def call(self, op: str, args: dict[str, Any], payload: bytes = b"") -> tuple[Any, bytes]:
        """One request and its answer (its payload may be a bytearray).

        If anything interrupts the call once it started (an error, a timeout or a
        cancellation), the request and answer streams may be out of step: the
        connection is marked broken and closed, and the caller must open a new one.
        """
        async with self.lock:
            while self._started is not None:  # a call from start_call is out
                await asyncio.shield(self._started)
            if self.closed:
                raise ConnectionResetError(f"connection to {self.peer} is closed")
            self.next_id += 1
            rid = self.next_id
            try:
                self.stream.write_frame({"id": rid, "op": op, "args": args}, payload)
                await self.stream.drain()
                header, data = await self.stream.read_frame()
                if header.get("id") != rid:
                    raise RemoteProtocolError(f"{self.peer} answered request {header.get('id')}, not {rid}")
            except BaseException:
                self.close()
                raise
        if isinstance(data, Piped):  # (our receiver wants no pipes: never)
            data = drain_pipe(data)
        if not header.get("ok"):
            raise RemoteError(f"{self.peer}: {header.get('error')}")
        return header.get("result"), data

    def start_call(self, op: str, args: dict[str, Any], then: Answered, timeout_s: float) -> bool:
        """Send a request now, from a callback: no task, nothing awaited (a redirected
        read's fast path). Its answer goes to ``then(result, payload, None)`` from the
        receive callback; ``then(None, None, err)`` gets a RemoteError for a refusal, or
        what ended the call: the connection lost (soon after, from the loop), no answer
        within ``timeout_s`` (TimeoutError) or a protocol violation; the connection is
        then closed. False, having sent nothing, when the connection is closed or busy
        (a call running or waiting for it): the caller uses :meth:`call`."""
        stream = self.stream
        if self.closed or self.lock.locked() or self._started is not None or stream.receiver.has_frames():
            return False
        self.next_id += 1
        rid = self.next_id
        loop = stream.loop
        started = self._started = loop.create_future()

        def end() -> None:
            self._started = None
            started.set_result(None)

        def answered(frame: Frame | None, err: Exception | None) -> None:
            timer.cancel()
            end()
            if frame is not None and frame[0].get("id") != rid:
                err = RemoteProtocolError(f"{self.peer} answered request {frame[0].get('id')}, not {rid}")
            if err is not None or frame is None:
                self.close()
                _answer(then, None, None, err or ConnectionResetError("no answer"))
                return
            header, data = frame
            if isinstance(data, Piped):  # (our receiver wants no pipes: never)
                data = drain_pipe(data)
            if not header.get("ok"):
                _answer(then, None, None, RemoteError(f"{self.peer}: {header.get('error')}"))
            else:
                _answer(then, header.get("result"), data, None)

        def expired() -> None:
            if stream.on_frame is answered:
                stream.on_frame = None
                end()
                self.close()
                _answer(then, None, None, TimeoutError(f"{self.peer} did not answer {op} within {timeout_s:g} s"))

        timer = loop.call_later(timeout_s, expired)
        stream.on_frame = answered
        try:
            stream.write_frame({"id": rid, "op": op, "args": args})
        except BaseException as err:
            timer.cancel()
            stream.on_frame = None
            end()
            if isinstance(err, (OSError, RemoteProtocolError)):  # ended meanwhile: nothing was sent
                return False
            raise
        return True

    def close(self) -> None:
        self.broken = True
        self.stream.close()
