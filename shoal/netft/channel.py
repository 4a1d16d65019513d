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
  header, not a copy of the whole block per layer.
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
  gets that error at once.
- :class:`ChannelServer` and :class:`Connection`: the handshake and the
  request/answer loop.

Payloads handed to the handler and returned by ``call`` are ``bytes`` or, when
received in place, a ``bytearray``. Payloads we send go to the transport as they
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
from shoal.util.pipes import FdWaiter, Piped
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

Frame = tuple[dict[str, Any], bytes]
#: a handler answers with a result and a payload: bytes, or data waiting in a pipe
#: (``util.pipes.Piped``), which is spliced to the socket and released
Handler = Callable[[str, str, dict[str, Any], bytes], Awaitable[tuple[Any, "bytes | Piped"]]]


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
                    self._part_header, self._part_hlen, self._part_plen = None, hlen, plen
                    self._begin_part(hlen, hstart)
                return  # else the header arrives in the scratch buffer
            header = decode_header(bytes(rx[hstart:pstart]))
            if pstart + plen > self._end:
                self._part_header, self._part_hlen = header, hlen
                self._begin_part(plen, pstart)
                return
            self._start = pstart + plen
            self._emit(header, bytes(rx[pstart : self._start]) if plen else b"", hlen)

    def _begin_part(self, size: int, start: int) -> None:
        """Receive the next ``size`` bytes in place; those from ``start`` to the end of
        the scratch buffer's data have arrived already (fewer than ``size``)."""
        part = unzeroed(size)  # every byte is received before the frame is emitted
        arrived = self._end - start
        part[:arrived] = self._rxv[start : self._end]
        self._start = self._end
        self._part, self._partv, self._filled = part, memoryview(part), arrived

    def _part_done(self) -> None:
        part = self._part
        assert part is not None
        # the reader gets the bytearray: keep no view of it (a view would pin its size)
        self._part = self._partv = None
        header = self._part_header
        if header is None:  # it was a large header
            header = decode_header(bytes(part))
            if self._part_plen:
                self._part_header = header
                self._begin_part(self._part_plen, self._end)
            else:
                self._emit(header, b"", self._part_hlen)
            return
        self._part_header = None
        # a bytearray reads like bytes to every user of a payload
        self._emit(header, cast(bytes, part), self._part_hlen)

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
        self._waiter: FdWaiter | None = None  # for spliced payloads (write_piped)
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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
        if receiver.has_frames():
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
        if self._reading_paused and receiver.queued_bytes <= QUEUE_LIMIT and self.transport:
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
        self._close_transport()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def write_piped(self, header: dict[str, Any], payload: Piped) -> None:
        """Send one frame whose payload waits in a pipe: the head through the
        transport, then the payload spliced from the pipe to the socket (no copy).
        The caller still owns ``payload`` (and releases it); no other frame may be
        written until this returns."""
        transport = self._open_transport()
        if self._waiter is None:
            self._waiter = FdWaiter(transport.get_extra_info("socket").fileno())
        waiter = self._waiter
        transport.write(encode_frame_head(header, len(payload)))
        while transport.get_write_buffer_size():  # the head first, all of it
            await waiter.writable()
        left = len(payload)
        while left:
            if self._error is not None:
                raise self._error
            try:
                n = os.splice(payload.r, waiter.fd, left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                await waiter.writable()
                continue
            if n == 0:
                raise ConnectionResetError("the pipe ran dry before the payload was sent")
            left -= n

    def _fail(self, err: Exception) -> None:
        if self._error is None:
            self._error = err
        _wake(self._reader)
        _wake(self._writer)
        if self._waiter is not None:
            self._waiter.fail(err)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class ChannelServer:
    """Accepts agents that prove they hold the cluster secret; refuses and logs others."""

    def __init__(self, cluster: str, node: str, key: bytes, handler: Handler):
        self.cluster = cluster
        self.node = node
        self.key = key
        self.handler = handler
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
        if not header.get("ok"):
            raise RemoteError(f"{self.peer}: {header.get('error')}")
        return header.get("result"), data

    def close(self) -> None:
        self.broken = True
        self.stream.close()
