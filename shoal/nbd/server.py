"""asyncio adapter of the NBD server: sockets, buffers and threads around the sans-I/O core.

Per connection, one :class:`asyncio.BufferedProtocol`:

- **Receive.** The kernel copies straight into one preallocated receive
  buffer (``get_buffer``); requests are parsed in place and a WRITE's payload
  is handed to the backend as a memoryview of that buffer, with no copy. The
  buffer grows to hold the largest message seen (bounded by the maximum block
  size) and is compacted only when a message straddles its end.
- **Execute.** Requests up to ``backend.inline_max`` bytes run on the event
  loop thread: page-cache I/O takes microseconds, a thread hop costs more.
  FLUSH, FUA, TRIM, WRITE_ZEROES, BLOCK_STATUS and large requests run in the
  server's thread pool (a WRITE's payload is copied first, because the
  receive buffer is reused).
- **Reply.** Replies produced while handling one receive batch are packed into
  one preallocated output buffer (READ data is ``preadv``'d straight into it)
  and sent with a single ``transport.write``. Replies may be out of order; the
  spec allows that.
- **Back-pressure.** When the transport's write buffer is full we stop reading.

A peer breaking the protocol is logged as one line and hard-disconnected;
it never touches other connections, which share only the backends.

Connection phases (:class:`Phase`, one table, every change logged at DEBUG)::

    handshake ──GO/EXPORT_NAME──▶ transmission ──DISC or EOF──▶ draining
        │                             │                           │
        └──── violation, ABORT ───────┴──── violation ────────────┴──▶ closed

In ``draining`` no more requests are read; replies still owed are sent, then
the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.nbd import replies
from shoal.nbd.backend import Backend
from shoal.nbd.constants import EIO, Cmd, CmdFlag, TxFlag
from shoal.nbd.errors import BackendError, LocalProtocolError, NBDError, RemoteProtocolError
from shoal.nbd.requests import Request, RequestChecker, parse_request
from shoal.nbd.server_handshake import (
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    Negotiated,
    Refused,
    ServerHandshake,
)

log = logging.getLogger(__name__)

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)

_RX_INITIAL = 256 * 1024
_RX_MIN_FREE = 64 * 1024
_OUT_SIZE = 1024 * 1024 + 64
#: requests of one connection queued for the thread pool before we stop reading
_MAX_TASKS = 128
_peer_ids = itertools.count(1)
#: Python >= 3.12 queues memoryviews of unsent data instead of copying them
_TRANSPORT_KEEPS_VIEWS = sys.version_info >= (3, 12)


class BackendCatalog:
    """Adapts a mapping export-name -> :class:`Backend` to the handshake's catalog."""

    def __init__(self, backends: Mapping[str, Backend]):
        self.backends = backends

    def names(self) -> list[str]:
        return list(self.backends)

    def lookup(self, name: str) -> ExportInfo | None:
        backend = self.backends.get(name)
        if backend is None:
            return None
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


class NBDServer:
    """Serves a mapping export-name -> :class:`Backend` on unix and TCP sockets."""

    def __init__(self, backends: Mapping[str, Backend], *, threads: int = 4):
        self.catalog = BackendCatalog(backends)
        self.backends = backends
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nbd-io")
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[_Connection] = set()
        self._unix_paths: list[str] = []

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket created mode 0600 (a stale socket file is replaced)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(path)
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Connection(self), sock=sock
            )
        except OSError as err:
            sock.close()
            raise NBDError(f"cannot listen on unix socket {path}: {err.strerror}") from err
        self._unix_paths.append(path)
        self._servers.append(server)

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the bound port (useful with port 0)."""
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: _Connection(self), host, port, reuse_address=True
            )
        except OSError as err:
            raise NBDError(f"cannot listen on {host}:{port}: {err.strerror}") from err
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.close("server shutting down", logging.INFO)
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # threads may still be inside a backend call: wait for them off the loop
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NBDError(f"{path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise NBDError(f"another server is listening on {path}")


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


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._hs: ServerHandshake | None = ServerHandshake(server.catalog)
        self._rx = bytearray(_RX_INITIAL)
        self._rxv = memoryview(self._rx)
        self._start = 0
        self._end = 0
        self._out = bytearray(_OUT_SIZE)
        self._outv = memoryview(self._out)
        self._opos = 0
        self._backend: Backend | None = None
        self._checker: RequestChecker | None = None
        self._structured = False
        self._context = 0
        self._max_payload = 0
        self._size = 0
        self._fast_read_max = 0
        self._fast_write_max = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self.phase = Phase.HANDSHAKE
        self._paused_by_transport = False
        self._paused_by_tasks = False
        self._reading = True

    def _set_phase(self, new: Phase) -> None:
        if new not in _TRANSITIONS[self.phase]:
            raise LocalProtocolError(f"connection cannot go from {self.phase.value} to {new.value}")
        log.debug("nbd %s: %s -> %s", self.peer, self.phase.value, new.value)
        self.phase = new

    # --- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix#{next(_peer_ids)}"
        self.server._conns.add(self)
        assert self._hs is not None
        transport.write(self._hs.data_to_send())

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
        try:
            if self.phase is Phase.HANDSHAKE:
                self._handshake()
            if self.phase is Phase.TRANSMISSION:
                self._process()
        except RemoteProtocolError as err:
            self.close(str(err))
        except Exception as err:  # noqa: BLE001 - e.g. a backend lookup failing: this client only
            log.exception("nbd %s: internal error; disconnecting", self.peer)
            self.close(f"internal error: {err}")
        finally:
            self._flush_out()

    def eof_received(self) -> bool:
        if self.phase is Phase.HANDSHAKE and self._hs is not None:
            self._hs.receive_data(b"")
            try:
                self._handshake()
            except RemoteProtocolError as err:
                self.close(str(err))
        elif self.phase is Phase.TRANSMISSION:
            if self._start != self._end:
                self.close(
                    f"client disconnected mid-request ({self._end - self._start} bytes pending)"
                )
            elif self._tasks:
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
        if self.phase is not Phase.CLOSED:
            self._set_phase(Phase.CLOSED)
        self.server._conns.discard(self)

    def pause_writing(self) -> None:
        self._paused_by_transport = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_by_transport = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Back-pressure: read only while the client also reads and the pool keeps up."""
        want = not (self._paused_by_transport or self._paused_by_tasks)
        transport = self.transport
        if want == self._reading or transport is None or transport.is_closing():
            return
        self._reading = want
        if want:
            transport.resume_reading()
            if self.phase is Phase.TRANSMISSION and self._start != self._end:
                # requests received before the pause: process them now
                try:
                    self._process()
                except RemoteProtocolError as err:
                    self.close(str(err))
                finally:
                    self._flush_out()
        else:
            transport.pause_reading()

    def close(self, reason: str = "", level: int = logging.WARNING) -> None:
        """Hard disconnect, logged as one line when there is a reason."""
        if self.phase is Phase.CLOSED:
            return
        self._set_phase(Phase.CLOSED)
        if reason:
            log.log(level, "nbd %s: %s; disconnecting", self.peer, reason)
        if self.transport is not None:
            self._flush_out()
            self.transport.close()

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
        assert hs is not None and self.transport is not None
        if self._end > self._start:
            hs.receive_data(self._rxv[self._start : self._end])
        self._start = self._end = 0
        event = hs.next_event()
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        if event is NEED_DATA:
            return
        if isinstance(event, Negotiated):
            self._enter_transmission(event, hs.leftover())
        elif isinstance(event, Refused):
            self.close(event.reason)
        elif isinstance(event, Aborted):
            self.close("client aborted the handshake", logging.DEBUG)
        elif isinstance(event, Closed):
            self.close("client closed between options", logging.DEBUG)

    def _enter_transmission(self, ev: Negotiated, leftover: bytes) -> None:
        backend = self.server.backends.get(ev.export.name)
        if backend is None:  # removed between GO and now
            self.close(f"export {ev.export.name!r} disappeared")
            return
        self._hs = None
        self._set_phase(Phase.TRANSMISSION)
        self._backend = backend
        self._structured = ev.structured
        self._context = ev.allocation_context or 0
        bs = ev.export.block_sizes
        self._max_payload = bs.maximum
        # the fast path skips RequestChecker: only when alignment and read-only cannot matter
        fast = min(backend.inline_max, bs.maximum) if bs.minimum == 1 else 0
        self._size = ev.export.size
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
            self._rxv[: len(leftover)] = leftover
            self._end = len(leftover)

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
        error, message = checker.check(req)
        if error:
            log.warning("nbd %s: %s request refused: %s", self.peer, _cmd_name(cmd), message)
            self._queue(replies.error_reply(req.cookie, error, message, self._structured))
            return
        if cmd == Cmd.DISC:
            self._disconnect()
            return
        payload = bytes(view[nxt - req.length : nxt]) if cmd == Cmd.WRITE else b""
        self._spawn(req, payload)

    def _read_inline(self, req: Request) -> None:
        backend = self._backend
        assert backend is not None
        length = req.length
        if self._opos + replies.DATA_HEADER + length > len(self._out):
            self._flush_out()
            if replies.DATA_HEADER + length > len(self._out):
                self._grow_out(replies.DATA_HEADER + length)
        pos = self._opos
        out = self._outv
        h = replies.pack_read_header(out, req.cookie, req.offset, length, self._structured, pos)
        try:
            backend.read_into(req.offset, out[pos + h : pos + h + length])
        except Exception as err:  # noqa: BLE001 - becomes an NBD error reply
            self._queue(
                replies.error_reply(req.cookie, *_error_of(err, self.peer), self._structured)
            )
            return
        self._opos = pos + h + length

    def _write_inline(self, req: Request, payload: memoryview) -> None:
        backend = self._backend
        assert backend is not None
        try:
            backend.write(req.offset, payload)
        except Exception as err:  # noqa: BLE001 - becomes an NBD error reply
            self._queue(
                replies.error_reply(req.cookie, *_error_of(err, self.peer), self._structured)
            )
            return
        self._queue(replies.simple_reply(req.cookie))

    def _spawn(self, req: Request, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.server.executor, self._execute, req, payload)
        self._tasks.add(fut)
        if len(self._tasks) >= _MAX_TASKS and not self._paused_by_tasks:
            self._paused_by_tasks = True
            self._update_reading()
        fut.add_done_callback(functools.partial(self._finished, req=req))

    def _execute(self, req: Request, payload: bytes) -> bytes:
        """Runs in the thread pool; returns the complete reply."""
        backend = self._backend
        assert backend is not None
        fua = bool(req.flags & CmdFlag.FUA)
        cmd = req.cmd
        if cmd == Cmd.READ:
            h = replies.DATA_HEADER if self._structured else replies.SIMPLE
            buf = bytearray(h + req.length)
            replies.pack_read_header(buf, req.cookie, req.offset, req.length, self._structured)
            backend.read_into(req.offset, memoryview(buf)[h:])
            return bytes(buf)
        if cmd == Cmd.WRITE:
            backend.write(req.offset, payload, fua=fua)
        elif cmd == Cmd.FLUSH:
            backend.flush()
        elif cmd == Cmd.TRIM:
            backend.trim(req.offset, req.length, fua=fua)
        elif cmd == Cmd.WRITE_ZEROES:
            backend.write_zeroes(
                req.offset, req.length, may_trim=not req.flags & CmdFlag.NO_HOLE, fua=fua
            )
        elif cmd == Cmd.BLOCK_STATUS:
            extents = _clip_extents(backend.block_status(req.offset, req.length), req.length)
            if req.flags & CmdFlag.REQ_ONE:
                extents = extents[:1]
            return replies.block_status_chunk(req.cookie, self._context, extents)
        return replies.simple_reply(req.cookie)

    def _finished(self, fut: asyncio.Future[bytes], *, req: Request) -> None:
        self._tasks.discard(fut)
        if self._paused_by_tasks and len(self._tasks) < _MAX_TASKS // 2:
            self._paused_by_tasks = False
            self._update_reading()
        if self.phase is Phase.CLOSED or fut.cancelled():
            return  # nobody to reply to
        err = fut.exception()
        if err is None:
            self._queue(fut.result())
        else:
            self._queue(
                replies.error_reply(req.cookie, *_error_of(err, self.peer), self._structured)
            )
        self._flush_out()
        if self.phase is Phase.DRAINING and not self._tasks:
            self.close()

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish what is in flight, then close."""
        self._set_phase(Phase.DRAINING)
        if not self._tasks:
            self.close("client disconnected (NBD_CMD_DISC)", logging.DEBUG)

    # --- output buffer ------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        n = len(data)
        if self._opos + n > len(self._out):
            self._flush_out()
            if n > len(self._out):
                if self.transport is not None:
                    self.transport.write(data)
                return
        self._outv[self._opos : self._opos + n] = data
        self._opos += n

    def _flush_out(self) -> None:
        if not self._opos or self.transport is None:
            self._opos = 0
            return
        transport = self.transport
        if transport.is_closing():
            self._opos = 0
            return
        transport.write(self._outv[: self._opos])
        self._opos = 0
        if _TRANSPORT_KEEPS_VIEWS and transport.get_write_buffer_size():
            # the unsent tail still references our buffer: take a fresh one
            self._grow_out(len(self._out))

    def _grow_out(self, size: int) -> None:
        self._out = bytearray(size)
        self._outv = memoryview(self._out)


def _clip_extents(extents: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
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


def _error_of(err: BaseException, peer: str) -> tuple[int, str]:
    if isinstance(err, BackendError):
        log.warning("nbd %s: backend error: %s", peer, err)
        return err.errno, str(err)
    if isinstance(err, OSError):
        log.warning("nbd %s: I/O error: %s", peer, err)
        return EIO, err.strerror or "I/O error"
    log.error("nbd %s: unexpected %s: %s", peer, type(err).__name__, err)
    return EIO, "internal server error"


def _cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"
