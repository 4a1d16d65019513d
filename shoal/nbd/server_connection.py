"""One client connection of the NBD server: an :class:`asyncio.BufferedProtocol`.

- **Receive.** The kernel copies straight into one preallocated receive
  buffer (``get_buffer``); requests are parsed in place and a WRITE's payload
  is handed to an inline backend call as a memoryview of that buffer, with no
  copy. The buffer grows to hold the largest message seen (bounded by the
  maximum block size) and is compacted only when a message straddles its end.
- **Handshake.** Driven by the sans-I/O :class:`ServerHandshake`. Its questions
  (which export is this name, may this holder register, fence that holder) are
  answered at once when we can (a plain mapping of exports, REGISTER), or by a
  task (an :class:`ExportResolver`, a PREEMPT waiting for fenced I/O); while a
  task runs we stop reading, and resume when it has answered.
- **Execute.** For a blocking :class:`Backend`, requests up to
  ``backend.inline_max`` bytes run on the event loop thread; FLUSH, FUA, TRIM,
  WRITE_ZEROES, BLOCK_STATUS and larger requests run in the server's thread
  pool. For an :class:`AsyncBackend` every request is a task on the loop
  (``server_work.py``). Work handed to the pool or a task gets its own copy of
  a WRITE's payload (``bytes`` for a task), because the receive buffer is reused.
- **Reply.** Replies produced while handling one receive batch are packed into
  one preallocated output buffer (READ data is ``preadv``'d straight into it)
  and sent with a single ``transport.write``; so are the replies of pool jobs
  and tasks that complete in one loop iteration (a flush scheduled with
  ``call_soon``). Once 16 KiB are buffered and the transport has nothing queued,
  they leave at once, so the client works on them while we make the rest.
  Those that complete while the transport is paused wait in ``_backlog`` instead of
  the transport's buffer (see ``_send_backlog``). Replies may be out of order;
  the spec allows that.
- **Back-pressure.** We stop reading while the transport's write buffer is
  full, while ``_MAX_WORK`` requests or ``_MAX_WORK_BYTES`` bytes of payload
  are in the pool or in tasks, and while a handshake question is out.

Ending a connection, three ways:

- ``close()``: a hard disconnect we decide (protocol violation, shutdown).
  Work not started is cancelled; tasks already running are cancelled too; no
  reply is sent for anything cancelled.
- The client disconnects: after NBD_CMD_DISC (``draining``) what is in flight
  finishes; otherwise as ``close()``.
- ``fence()`` (PREEMPT): nothing more starts: work not started is discarded
  without reply, work whose backend call began (a pool thread, a task past its
  first step) runs to completion, and the socket is closed abortively (RST on
  TCP) so bytes still arriving are dropped by the kernel. ``fence()`` returns
  the futures of that running work; the server acknowledges the PREEMPT only
  when they are done.

A connection stays in ``NBDServer._conns`` until its transport is gone *and*
its last piece of work has finished, so a later PREEMPT still waits for it.

Phases (:class:`Phase`, one table, every change logged at DEBUG)::

    handshake ──GO/EXPORT_NAME──▶ transmission ──DISC or EOF──▶ draining
        │                             │                           │
        └── violation, ABORT, fence ──┴── violation, fence ───────┴──▶ closed
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import itertools
import logging
import socket
import struct
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from shoal.nbd import replies
from shoal.nbd.backend import AnyBackend, AsyncBackend, Backend, ExportResolver
from shoal.nbd.constants import Cmd, Opt, Rep, TxFlag
from shoal.nbd.errors import BackendError, LocalProtocolError, RemoteProtocolError
from shoal.nbd.fencing import PreemptOrder, Registration
from shoal.nbd.requests import Request, RequestChecker, parse_request
from shoal.nbd.server_handshake import (
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    ListExports,
    LookupExport,
    Negotiated,
    Preempt,
    Refused,
    Register,
    ServerHandshake,
)
from shoal.nbd.server_work import (
    Framing,
    Reply,
    Work,
    cmd_name,
    error_of,
    read_reply,
    run_async,
    run_blocking,
)
from shoal.util.buffers import unzeroed
from shoal.util.transports import write_together

if TYPE_CHECKING:
    from shoal.nbd.server import NBDServer

log = logging.getLogger("shoal.nbd.server")

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)

_RX_INITIAL = 256 * 1024
_RX_MIN_FREE = 64 * 1024
_OUT_SIZE = 1024 * 1024 + 64
#: replies buffered beyond this are sent at once (see _flush_early)
_FLUSH_EARLY = 16 * 1024
#: reply data at least this large goes to the transport as is, not through _out
_WRITE_DIRECT_MIN = 64 * 1024
#: requests of one connection in the pool or in tasks before we stop reading ...
_MAX_WORK = 128
#: ... or bytes of WRITE payload copies and READ buffers they hold (this also bounds
#: the replies that can pile up for a client that does not read them)
_MAX_WORK_BYTES = 32 * 1024 * 1024
#: pool jobs of this many bytes and more use buffers from the server's BufferPool
_POOL_BUFFER_MIN = 16 * 1024
_peer_ids = itertools.count(1)
#: Python >= 3.12 queues memoryviews of unsent data instead of copying them; so does
#: uvloop (any loop not from asyncio itself is assumed to, see :func:`_keeps_views`)
_TRANSPORT_KEEPS_VIEWS = sys.version_info >= (3, 12)


def _keeps_views(loop: asyncio.AbstractEventLoop) -> bool:
    """Does ``transport.write`` of this loop keep a view of data it could not send yet
    (so the buffer must not be written again until it is sent)?"""
    return _TRANSPORT_KEEPS_VIEWS or not type(loop).__module__.startswith("asyncio")

#: options after whose answer transmission begins: a fenced registration may not pass
_GO_OPTIONS = frozenset({Opt.GO, Opt.EXPORT_NAME})

_T = TypeVar("_T")


class Phase(enum.Enum):
    """Life of one connection. Names are stable (they appear in logs)."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    DRAINING = "draining"  # NBD_CMD_DISC or EOF: finish requests in flight, then close
    CLOSED = "closed"


_TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.HANDSHAKE: {Phase.TRANSMISSION, Phase.CLOSED},
    Phase.TRANSMISSION: {Phase.DRAINING, Phase.CLOSED},
    Phase.DRAINING: {Phase.CLOSED},
    Phase.CLOSED: set(),
}


def _info_of(name: str, backend: AnyBackend | None) -> ExportInfo | None:
    if backend is None:
        return None
    if not isinstance(backend, Backend | AsyncBackend):
        raise TypeError(f"the export lookup returned a {type(backend).__name__}, not a backend")
    flags = (
        TxFlag.HAS_FLAGS
        | TxFlag.SEND_FLUSH
        | TxFlag.SEND_FUA
        | TxFlag.SEND_TRIM
        | TxFlag.SEND_WRITE_ZEROES
    )
    if backend.read_only:
        flags |= TxFlag.READ_ONLY
    if backend.can_multi_conn:
        flags |= TxFlag.CAN_MULTI_CONN
    return ExportInfo(name, backend.size, flags, backend.block_sizes, backend.description)


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # (looked up once: it costs a getpid())
        self.peer = "?"
        #: set once NBD_OPT_SHOAL_REGISTER was accepted; PREEMPT finds us by it
        self.registration: Registration | None = None
        self._hs: ServerHandshake | None = ServerHandshake()
        self._asking: asyncio.Task[Any] | None = None  # answers a handshake question
        self._resolved: tuple[str, AnyBackend] | None = None  # last export looked up
        self._rx = bytearray(_RX_INITIAL)
        self._rxv = memoryview(self._rx)
        self._start = 0
        self._end = 0
        self._out = bytearray(_OUT_SIZE)
        self._outv = memoryview(self._out)
        self._opos = 0
        self._backend: Backend | None = None
        self._abackend: AsyncBackend | None = None
        self._checker: RequestChecker | None = None
        self._structured = False
        self._framing = Framing(structured=False, context=0)
        self._max_payload = 0
        self._size = 0
        self._fast_read_max = 0
        self._fast_write_max = 0
        self._plain_read_max = 0
        self._minimum = 1
        self._work: dict[asyncio.Future[Reply], Work] = {}
        self._work_bytes = 0
        #: completed replies waiting for the transport to drain (with their pool buffer)
        self._backlog: collections.deque[tuple[Reply, bytearray | None]] = collections.deque()
        self._lost = False
        self.phase = Phase.HANDSHAKE
        self._paused_by_transport = False
        self._flush_scheduled = False
        self._keeps_views = _TRANSPORT_KEEPS_VIEWS  # and see connection_made
        self._paused_by_work = False
        self._paused_by_question = False
        self._reading = True

    def _set_phase(self, new: Phase) -> None:
        if new not in _TRANSITIONS[self.phase]:
            raise LocalProtocolError(f"connection cannot go from {self.phase.value} to {new.value}")
        log.debug("nbd %s: %s -> %s", self.peer, self.phase.value, new.value)
        self.phase = new

    def pending_work(self) -> list[asyncio.Future[Any]]:
        """Futures of requests in the pool or in tasks (for shutdown)."""
        futures: list[asyncio.Future[Any]] = list(self._work)
        if self._asking is not None:
            futures.append(self._asking)
        return futures

    # --- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._keeps_views = _keeps_views(self._loop)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix#{next(_peer_ids)}"
        self.server._conns.add(self)
        assert self._hs is not None
        self.transport.write(self._hs.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._rx) - self._end < _RX_MIN_FREE:
            self._compact(len(self._rx))
        return self._rxv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self.phase is Phase.DRAINING or self.phase is Phase.CLOSED:
            self._start = self._end = 0  # nothing may follow NBD_CMD_DISC
            return
        self._guarded(self._receive)

    def _receive(self) -> None:
        if self.phase is Phase.HANDSHAKE:
            self._handshake()
        if self.phase is Phase.TRANSMISSION:
            self._process()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step``; a violation or our own bug ends this connection only."""
        try:
            step()
        except RemoteProtocolError as err:
            self.close(str(err))
        except Exception as err:  # noqa: BLE001 - a bug must not take the server down
            log.exception("nbd %s: internal error; disconnecting", self.peer)
            self.close(f"internal error: {err}")
        finally:
            self._flush_out()

    def eof_received(self) -> bool:
        if self.phase is Phase.HANDSHAKE and self._hs is not None:
            self._hs.receive_data(b"")
            self._guarded(self._handshake)
        elif self.phase is Phase.TRANSMISSION:
            if self._start != self._end:
                self.close(
                    f"client disconnected mid-request ({self._end - self._start} bytes pending)"
                )
            elif self._work or self._backlog:
                self._set_phase(Phase.DRAINING)  # half-closed: send the replies still owed
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is Phase.TRANSMISSION and self._start != self._end:
            log.warning(
                "nbd %s: connection lost mid-request (%d bytes pending)",
                self.peer,
                self._end - self._start,
            )
        if self.phase is Phase.HANDSHAKE or self.phase is Phase.TRANSMISSION:
            # the peer vanished: nobody to reply to. (After DISC the client wants its
            # requests done; after close() they are cancelled; after fence() the ones
            # running must complete.)
            self._cancel_all()
        if self.phase is not Phase.CLOSED:
            self._set_phase(Phase.CLOSED)
        self._lost = True
        self._forget_if_idle()

    def pause_writing(self) -> None:
        self._paused_by_transport = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_by_transport = False
        self._send_backlog()
        self._update_reading()

    def _update_reading(self) -> None:
        """Back-pressure: read only while the client reads, work keeps up and no question is out."""
        want = not (self._paused_by_transport or self._paused_by_work or self._paused_by_question)
        transport = self.transport
        if want == self._reading or transport is None or transport.is_closing():
            return
        self._reading = want
        if want:
            transport.resume_reading()
            if self.phase is Phase.TRANSMISSION and self._start != self._end:
                self._guarded(self._process)  # requests received before the pause
        else:
            transport.pause_reading()

    # --- ending -------------------------------------------------------------

    def close(self, reason: str = "", level: int = logging.WARNING) -> None:
        """Hard disconnect, logged as one line when there is a reason."""
        if self.phase is Phase.CLOSED:
            return
        self._set_phase(Phase.CLOSED)
        if reason:
            log.log(level, "nbd %s: %s; disconnecting", self.peer, reason)
        self._cancel_all()
        if self.transport is not None:
            self._flush_out()
            self.transport.close()

    def fence(self) -> list[asyncio.Future[Reply]]:
        """PREEMPT: start nothing more, drop the socket; returns the work already running."""
        running = [f for f, w in list(self._work.items()) if not w.cancel_unstarted(f)]
        self._backlog.clear()
        if self._asking is not None:
            self._asking.cancel()
        if self.phase is not Phase.CLOSED:
            self._set_phase(Phase.CLOSED)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # RST: the kernel drops what it still holds in both directions
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return running

    def _cancel_all(self) -> None:
        self._backlog.clear()
        for future, work in list(self._work.items()):
            work.cancel(future)
        if self._asking is not None:
            self._asking.cancel()

    def _forget_if_idle(self) -> None:
        if self._lost and not self._work:
            self.server._conns.discard(self)

    # --- receive buffer -----------------------------------------------------

    def _compact(self, capacity: int) -> None:
        pending = bytes(self._rxv[self._start : self._end])
        if capacity > len(self._rx):
            self._rx = bytearray(capacity)
            self._rxv = memoryview(self._rx)
        self._rxv[: len(pending)] = pending
        self._start, self._end = 0, len(pending)

    # --- handshake ------------------------------------------------------------

    def _handshake(self) -> None:
        hs = self._hs
        assert hs is not None
        if self._end > self._start:
            hs.receive_data(self._rxv[self._start : self._end])
        self._start = self._end = 0
        self._advance()

    def _advance(self) -> None:
        """Run the handshake until it needs bytes, waits for a task's answer, or ends."""
        hs = self._hs
        assert hs is not None and self.transport is not None
        while self.phase is Phase.HANDSHAKE and self._asking is None:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                self.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, LookupExport):
                self._lookup(hs, event)
            elif isinstance(event, ListExports):
                self._list(hs)
            elif isinstance(event, Register):
                self._register(hs, event.registration)
            elif isinstance(event, Preempt):
                self._preempt(hs, event.order)
            elif isinstance(event, Negotiated):
                self._enter_transmission(event, hs.leftover())
            elif isinstance(event, Refused):
                self.close(event.reason)
            elif isinstance(event, Aborted):
                self.close("client aborted the handshake", logging.DEBUG)
            elif isinstance(event, Closed):
                self.close("client closed between options", logging.DEBUG)

    def _ask(
        self,
        coro: Coroutine[Any, Any, _T],
        answer: Callable[[_T], None],
        failed: Callable[[Exception], None],
    ) -> None:
        """Answer a handshake question from a task; read nothing until it is answered."""
        task = asyncio.get_running_loop().create_task(coro)
        self._asking = task
        self._paused_by_question = True
        self._update_reading()

        def done(task: asyncio.Task[_T]) -> None:
            self._asking = None
            if task.cancelled():
                return
            err = task.exception()
            if self.phase is not Phase.HANDSHAKE:
                return

            def resume() -> None:
                if err is None:
                    answer(task.result())
                elif isinstance(err, Exception):
                    failed(err)
                else:
                    raise err
                self._paused_by_question = False
                self._advance()
                self._update_reading()
                if self.phase is Phase.TRANSMISSION and self._reading:
                    self._process()  # requests that came with the final option

            self._guarded(resume)

        task.add_done_callback(done)

    def _lookup(self, hs: ServerHandshake, question: LookupExport) -> None:
        exports = self.server.exports

        def failed(err: Exception) -> None:
            log.warning(
                "nbd %s: looking up export %r failed: %s: %s",
                self.peer,
                question.name,
                type(err).__name__,
                err,
            )
            hs.refuse(Rep.ERR_UNKNOWN, f"looking up export {question.name!r} failed: {err}")

        if isinstance(exports, ExportResolver):
            resolver = exports

            async def resolve() -> tuple[AnyBackend | None, ExportInfo | None]:
                backend = await resolver.resolve(question.name)
                return backend, _info_of(question.name, backend)

            self._ask(resolve(), lambda found: self._found(hs, question, *found), failed)
            return
        try:
            backend = exports.get(question.name)
            info = _info_of(question.name, backend)
        except Exception as err:  # noqa: BLE001 - this client gets the error
            failed(err)
            return
        self._found(hs, question, backend, info)

    def _found(
        self,
        hs: ServerHandshake,
        question: LookupExport,
        backend: AnyBackend | None,
        info: ExportInfo | None,
    ) -> None:
        if backend is None or info is None:
            hs.answer_export(None)
            return
        refusal = self._fenced()
        if refusal is not None and question.option in _GO_OPTIONS:
            log.warning("nbd %s: %s refused: %s", self.peer, question.option.name, refusal)
            hs.refuse(Rep.ERR_POLICY, refusal)
            return
        self._resolved = (question.name, backend)
        hs.answer_export(info)

    def _list(self, hs: ServerHandshake) -> None:
        exports = self.server.exports

        def failed(err: Exception) -> None:
            log.warning("nbd %s: listing exports failed: %s: %s", self.peer, type(err).__name__, err)
            hs.refuse(Rep.ERR_UNKNOWN, f"listing exports failed: {err}")

        if isinstance(exports, ExportResolver):
            self._ask(exports.names(), hs.answer_names, failed)
            return
        try:
            hs.answer_names(list(exports))
        except Exception as err:  # noqa: BLE001 - this client gets the error
            failed(err)

    def _fenced(self) -> str | None:
        """Why this connection may not enter transmission, if it may not."""
        reg = self.registration
        return None if reg is None else self.server.floors.refusal(reg)

    def _register(self, hs: ServerHandshake, reg: Registration) -> None:
        refusal = self.server.floors.refusal(reg)
        if refusal is not None:
            log.warning("nbd %s: REGISTER refused: %s", self.peer, refusal)
            hs.refuse(Rep.ERR_POLICY, refusal)
            return
        self.registration = reg
        hs.accept()
        log.debug("nbd %s: registered as holder %s key %d", self.peer, reg.holder, reg.key)

    def _preempt(self, hs: ServerHandshake, order: PreemptOrder) -> None:
        floor, fenced, running = self.server.fence(order, by=self)
        what = (
            f"nbd fencing: holder {order.holder} fenced below key {floor} at the request of "
            f"{self.peer}: {fenced} connection(s) closed"
        )

        async def settle() -> None:
            try:
                if running:
                    await asyncio.wait(running)  # never cancels them, even if we are cancelled
            except asyncio.CancelledError:
                log.warning("%s; the preempting client left before its ACK", what)
                raise
            log.warning("%s, %d request(s) already running completed first", what, len(running))

        def done(_: None) -> None:
            hs.accept()  # the commit point: fenced I/O is over, and the client may rely on it

        def failed(err: Exception) -> None:  # settle() cannot fail; answer anyway
            hs.refuse(Rep.ERR_UNKNOWN, f"preempt failed: {err}")

        self._ask(settle(), done, failed)

    def _enter_transmission(self, ev: Negotiated, leftover: bytes) -> None:
        resolved, self._resolved = self._resolved, None
        if resolved is None or resolved[0] != ev.export.name:
            raise LocalProtocolError(f"export {ev.export.name!r} was negotiated without a lookup")
        backend = resolved[1]
        self._hs = None
        self._set_phase(Phase.TRANSMISSION)
        if isinstance(backend, AsyncBackend):
            self._abackend = backend
            fast = 0
        else:
            self._backend = backend
            fast = backend.inline_max
        self._structured = ev.structured
        self._framing = Framing(ev.structured, ev.allocation_context or 0)
        bs = ev.export.block_sizes
        self._max_payload = bs.maximum
        # the fast path skips RequestChecker: only when alignment and read-only cannot matter
        fast = min(fast, bs.maximum) if bs.minimum == 1 else 0
        self._size = ev.export.size
        self._minimum = bs.minimum
        self._plain_read_max = bs.maximum
        self._fast_read_max = fast
        self._fast_write_max = 0 if ev.flags & TxFlag.READ_ONLY else fast
        self._checker = RequestChecker(
            size=ev.export.size,
            flags=ev.flags,
            structured=ev.structured,
            allocation_context=ev.allocation_context,
            minimum=bs.minimum,
            maximum=bs.maximum,
        )
        log.debug(
            "nbd %s: serving export %r (structured=%s)", self.peer, ev.export.name, ev.structured
        )
        if leftover:
            if len(leftover) + _RX_MIN_FREE > len(self._rx):
                self._rx = bytearray(len(leftover) + _RX_MIN_FREE)
                self._rxv = memoryview(self._rx)
            self._rxv[: len(leftover)] = leftover
            self._start, self._end = 0, len(leftover)

    # --- transmission -----------------------------------------------------

    def _process(self) -> None:
        view = self._rxv
        start, end = self._start, self._end
        max_payload = self._max_payload
        # stop while paused: requests already received wait in the buffer, so a client
        # that floods requests without reading replies costs bounded memory
        while start < end and self.phase is Phase.TRANSMISSION and self._reading:
            req, nxt = parse_request(view, start, end, max_payload)
            if req is None:
                if nxt > len(self._rx) - start:  # message larger than the buffer: grow
                    self._start = start
                    self._compact(nxt + _RX_MIN_FREE)
                    return
                break
            self._dispatch(req, view, nxt)
            start = nxt
        self._start = start

    def _dispatch(self, req: Request, view: memoryview, nxt: int) -> None:
        checker = self._checker
        assert checker is not None
        cmd = req.cmd
        # hot path: a plain READ/WRITE that is obviously valid runs inline, unchecked
        if not req.flags and 0 < req.length and req.offset + req.length <= self._size:
            if cmd == _READ and req.length <= self._fast_read_max:
                self._read_inline(req)
                return
            if cmd == _WRITE and req.length <= self._fast_write_max:
                self._write_inline(req, view[nxt - req.length : nxt])
                return
            if cmd == _READ and req.length <= self._plain_read_max and not (req.offset | req.length) % self._minimum:
                self._spawn(req, view[:0])  # a plain READ too large to run inline: as valid
                return
        error, message = checker.check(req)
        if error:
            log.warning("nbd %s: %s request refused: %s", self.peer, cmd_name(cmd), message)
            self._queue(replies.error_reply(req.cookie, error, message, self._structured))
            return
        if cmd == _DISC:
            self._disconnect()
            return
        self._spawn(req, view[nxt - req.length : nxt] if cmd == _WRITE else view[:0])

    def _read_inline(self, req: Request) -> None:
        backend = self._backend
        assert backend is not None
        at = self._read_header_out(req)
        try:
            backend.read_into(req.offset, self._outv[at : at + req.length])
        except Exception as err:  # noqa: BLE001 - becomes an NBD error reply
            self._queue(
                replies.error_reply(req.cookie, *error_of(err, self.peer), self._structured)
            )
            return
        self._opos = at + req.length
        if self._opos >= _FLUSH_EARLY:
            self._flush_early()

    def _read_header_out(self, req: Request) -> int:
        """Pack a READ reply's header in the output buffer, with room for its data after
        it; returns where the data goes (the caller advances ``_opos`` once it is there)."""
        length = req.length
        if self._opos + replies.DATA_HEADER + length > len(self._out):
            self._flush_out()
            if replies.DATA_HEADER + length > len(self._out):
                self._grow_out(replies.DATA_HEADER + length)
        pos = self._opos
        return pos + replies.pack_read_header(self._outv, req.cookie, req.offset, length, self._structured, pos)

    def _write_inline(self, req: Request, payload: memoryview) -> None:
        backend = self._backend
        assert backend is not None
        try:
            backend.write(req.offset, payload)
        except Exception as err:  # noqa: BLE001 - becomes an NBD error reply
            self._queue(
                replies.error_reply(req.cookie, *error_of(err, self.peer), self._structured)
            )
            return
        self._queue(replies.simple_reply(req.cookie))

    def _spawn(self, req: Request, payload: memoryview) -> None:
        """Hand a request to the pool or a task; it gets its own copy of a WRITE's payload."""
        cmd = req.cmd
        nbytes = req.length if cmd == _WRITE or cmd == _READ else 0
        future: asyncio.Future[Any]  # the Reply, or a read_now's data (work.now)
        if self._abackend is not None:
            loop = self._loop
            future = loop.create_future()
            if cmd == _READ and self._abackend.read_now(
                    req.offset, req.length, functools.partial(self._read_done, future)):
                work = Work(req, nbytes, started=True, now=True)
            else:
                work = Work(req, nbytes)
                future = loop.create_task(run_async(self._abackend, work, bytes(payload), self._framing))
        else:
            assert self._backend is not None
            buf = self.server.buffers.take(nbytes) if nbytes >= _POOL_BUFFER_MIN else None
            if buf is not None and cmd == _WRITE:
                buf[:nbytes] = payload
                payload = memoryview(buf)[:nbytes]
            elif cmd == _WRITE:
                payload = memoryview(bytes(payload))
            pool = self.server.executor.submit(
                run_blocking, self._backend, req, payload, buf, self._framing
            )
            work = Work(req, nbytes, pool=pool, buf=buf)
            future = asyncio.wrap_future(pool)
        self._work[future] = work
        self._work_bytes += nbytes
        if not self._paused_by_work and (
            len(self._work) >= _MAX_WORK or self._work_bytes >= _MAX_WORK_BYTES
        ):
            self._paused_by_work = True
            self._update_reading()
        future.add_done_callback(self._finished)

    def _read_done(self, future: asyncio.Future[Any], data: bytes | None, err: BaseException | None) -> None:
        """A read_now's end: its reply is queued now, not one loop step later."""
        if future.done():  # cancelled (the connection ended): _finished has run
            return
        future.remove_done_callback(self._finished)
        req = self._work[future].req
        if (data is not None and len(data) == req.length < _WRITE_DIRECT_MIN and not self._backlog
                and self.phase is Phase.TRANSMISSION and not self._paused_by_transport):
            # the common case, short: the reply goes straight into the output buffer
            future.set_result(None)
            self._forget_work(future)
            at = self._read_header_out(req)
            self._outv[at : at + req.length] = data
            self._opos = at + req.length
            if self._opos >= _FLUSH_EARLY:
                self._flush_early()
            self._schedule_flush()
            return
        if err is None:
            future.set_result(data)
        else:
            future.set_exception(err)
        self._finished(future)

    def _forget_work(self, future: asyncio.Future[Any]) -> Work:
        """Work that ended leaves the books (reading resumes if it had paused for it)."""
        work = self._work.pop(future)
        self._work_bytes -= work.nbytes
        if self._paused_by_work and (
            len(self._work) < _MAX_WORK // 2 and self._work_bytes < _MAX_WORK_BYTES // 2
        ):
            self._paused_by_work = False
            self._update_reading()
        return work

    def _finished(self, future: asyncio.Future[Any]) -> None:
        work = self._forget_work(future)
        err = None if future.cancelled() else future.exception()  # always retrieved
        if self.phase is Phase.CLOSED or future.cancelled():
            self._give_back(work.buf)
            self._forget_if_idle()
            return  # nobody to reply to, or we decided not to
        if err is None and work.now:
            try:
                reply = read_reply(work.req, future.result(), self._framing)
            except BackendError as bad:
                err = bad
        elif err is None:
            reply = future.result()
        if err is not None:
            req = work.req
            code, message = error_of(err, self.peer)
            reply = (replies.error_reply(req.cookie, code, message, self._structured),)
        self._backlog.append((reply, work.buf))
        self._send_backlog()

    def _send_backlog(self) -> None:
        """Send completed replies while the transport takes them.

        While the transport is paused, replies wait here rather than in its buffer:
        asyncio (< 3.12) trims that buffer from the front after each send, so a
        backlog of megabytes there costs a memmove of megabytes per send.
        """
        backlog = self._backlog
        while backlog and not self._paused_by_transport:
            reply, buf = backlog.popleft()
            copied = True
            for piece in reply:
                copied = self._queue(piece) and copied
            if copied or not self._keeps_views:
                self._give_back(buf)  # else the transport may still read it
            if self._opos >= _FLUSH_EARLY:
                self._flush_early()
        self._schedule_flush()
        if self.phase is Phase.DRAINING and not self._work and not backlog:
            self.close()

    def _give_back(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.server.buffers.give(buf)

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish what is in flight, then close."""
        self._set_phase(Phase.DRAINING)
        if not self._work and not self._backlog:
            self.close("client disconnected (NBD_CMD_DISC)", logging.DEBUG)

    # --- output buffer ------------------------------------------------------

    def _queue(self, data: bytes | bytearray | memoryview) -> bool:
        """Append to the output buffer; False if ``data`` went to the transport as is
        (large data, which a copy would only slow down)."""
        n = len(data)
        if n >= _WRITE_DIRECT_MIN or n > len(self._out):
            self._flush_out(data)  # with what is buffered (its header), in one send
            return False
        if self._opos + n > len(self._out):
            self._flush_out()
        self._outv[self._opos : self._opos + n] = data
        self._opos += n
        return True

    def _flush_early(self) -> None:
        """Send what is buffered now, not at the end of this step, if the transport
        has nothing queued (the client starts on these replies while we make the next
        ones; a transport already backed up gains nothing from it)."""
        if self.transport is not None and not self.transport.get_write_buffer_size():
            self._flush_out()

    def _schedule_flush(self) -> None:
        """What is buffered leaves at the end of this loop iteration, with the replies
        that complete meanwhile, in one write."""
        if self._opos and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush_out()

    def _flush_out(self, then: bytes | bytearray | memoryview = b"") -> None:
        """Send what is buffered, and ``then`` after it (as it is, in the same send)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._opos = 0
            return
        if not self._opos:
            if then:
                transport.write(then)
            return
        if then:
            write_together(transport, (self._outv[: self._opos], then))
        else:
            transport.write(self._outv[: self._opos])
        self._opos = 0
        if self._keeps_views and transport.get_write_buffer_size():
            # the unsent tail still references our buffer: take a fresh one
            self._grow_out(len(self._out))

    def _grow_out(self, size: int) -> None:
        self._out = unzeroed(size)  # only what was written into it is ever sent
        self._outv = memoryview(self._out)
