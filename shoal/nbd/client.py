"""asyncio NBD client: the storage path to an export served over the network.

One :class:`NBDClient` is one connection. Requests are pipelined (up to
``max_in_flight``; beyond that they wait in a local queue) and matched to
replies by cookie.

Failure model, written for the node agent's storage path:

- A request that outlives ``request_timeout_s`` declares the path broken:
  the whole connection is aborted, because an NBD request cannot be cancelled
  and a write still in flight could otherwise land later. One watchdog timer per
  connection checks the oldest request every quarter of the timeout (so a
  request is given up between 1 and 1.25 timeouts after it was sent; time
  spent queued for a slot is bounded by the requests ahead of it).
- :meth:`NBDClient.abort` is that abortive close: requests still queued here
  are discarded without being sent, bytes still in asyncio's send buffer are
  dropped (``transport.abort()``; on TCP ``SO_LINGER=0`` also makes the
  kernel drop its send queue with a RST), and every waiter fails with
  :class:`ConnectionAborted`. Writes already handed to the kernel of a unix
  socket have reached the server; their outcome is unknown, and abort()
  reports how many there were.
- :meth:`NBDClient.reconnect` opens a fresh connection with retries; it never
  replays anything. Whether to retry a failed write is the caller's decision.

Fencing (docs/NBD.md): a client made with ``register=(holder, key)`` sends
``NBD_OPT_SHOAL_REGISTER`` before GO on every connection it opens, so the
server can fence it; :func:`preempt` fences a holder's connections below a key
and returns only when the server has finished doing so. A refused registration
raises :class:`NBDFenced`, a server without fencing :class:`FencingUnsupported`;
neither is retried by :meth:`NBDClient.reconnect`.

Timeouts are the only timing this module knows, grouped in
:class:`ClientSettings`; the sans-I/O layers below take none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from shoal.nbd import wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.client_handshake import ClientHandshake, ExportList, Preempted, Ready
from shoal.nbd.constants import REQUEST_MAGIC, Cmd, CmdFlag, TxFlag
from shoal.nbd.errors import (
    ConnectionAborted,
    LocalProtocolError,
    NBDCommandError,
    NBDConnectionError,
    NBDError,
    ProtocolError,
    RemoteProtocolError,
    RequestTimeout,
)
from shoal.nbd.fencing import PreemptOrder, Registration, check_holder, check_key
from shoal.nbd.replies import LARGE_READ, ReplyEvent, ReplyParser
from shoal.nbd.server_handshake import NEED_DATA
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

Address = str | tuple[str, int]
# plain ints and a bound method: enum attribute lookups cost on every request
_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_pack_request = wire.REQUEST.pack
#: a start_read's callback: (buffer, None) or (None, error)
Then = Callable[[object, "NBDError | None"], None]


@dataclass(frozen=True)
class ClientSettings:
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    reconnect_attempts: int = 5
    reconnect_delay_s: float = 0.2  # doubles after each failed attempt ...
    reconnect_max_delay_s: float = 2.0  # ... up to this
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.reconnect_attempts < 1 or self.max_in_flight < 1:
            raise ValueError("reconnect_attempts and max_in_flight must be at least 1")


@dataclass(slots=True)
class _Pending:
    cmd: int
    offset: int
    future: asyncio.Future[object]
    started: float = 0.0  # loop time it was sent
    buf: bytearray | None = None
    #: a pipe the read's data may be spliced into instead (read_piped); it belongs to
    #: the request until the reply is done, then to whoever takes the result
    pipe: tuple[int, int] | None = None
    spliced: bool = False  # the data is in ``pipe``, not in ``buf``
    extents: list[tuple[int, int]] | None = None  # BLOCK_STATUS only: none made per request
    error: int = 0
    message: str = ""
    #: a start_read's callback (the future then only marks the request done)
    then: Then | None = None


class _Link(asyncio.BufferedProtocol):
    """Byte pump between the transport and the client's parsers.

    The transport receives into a scratch buffer whose bytes the parsers copy what
    they need from, except for the data of a read: once its header is parsed, the
    transport receives the rest straight into the read's own buffer.
    """

    def __init__(self, client: NBDClient, hs: ClientHandshake):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # (looked up once: it costs a getpid())
        self.handshake_done: asyncio.Future[Ready | ExportList | Preempted] = self.loop.create_future()
        self.hs: ClientHandshake | None = hs
        self.parser = ReplyParser()
        # flow control: large payloads are written in pieces, each only while the
        # transport wants more, so its buffer stays small (asyncio's buffer is a
        # bytearray trimmed from the front: a big backlog costs quadratic copying)
        self.writable = asyncio.Event()
        self.writable.set()
        self.write_lock = asyncio.Lock()  # held while a request is written in pieces
        # small requests are corked: those made in one loop iteration leave in one
        # write (one syscall) at the start of the next, or as soon as _CORK_REQUESTS
        # are corked (the server starts on those while we make the next ones)
        self._cork = bytearray()
        self._corked = 0
        self._cork_scheduled = False
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._receiving_into = False  # the last get_buffer() gave a read's own buffer
        self._fd = -1
        self._waiter: FdWaiter | None = None
        self._splicing: _Splice | None = None

    def send_small(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        """Queue a request whose payload is small; it goes out with the others of this
        loop iteration, in order."""
        if not self._cork_scheduled:
            self._cork_scheduled = True
            self.loop.call_soon(self.uncork)
        self._cork += header
        if payload:
            self._cork += payload
        self._corked += 1
        if self._corked >= _CORK_REQUESTS:
            self.uncork()

    def uncork(self) -> None:
        """Write what is corked now (before anything written to the transport directly)."""
        self._cork_scheduled = False
        self._corked = 0
        if not self._cork:
            return
        out, self._cork = self._cork, bytearray()  # the transport may keep ``out``
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            self._waiter = FdWaiter(self._fd)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.hs is not None:
            self._receiving_into = False
            return self._scratch
        into = self.parser.want_into()
        self._receiving_into = into is not None
        if into is not None:
            return into
        room = self.parser.header_room()
        return self._scratch if room is None else self._scratch[:room]

    def buffer_updated(self, nbytes: int) -> None:
        if self._receiving_into:
            self._deliver(lambda: self.parser.received_into(nbytes))
        else:
            self.data_received(self._scratch[:nbytes])  # the parsers copy what they keep
        if self.client._piped and self._splicing is None:
            self._check_splice()

    def data_received(self, data: bytes | memoryview) -> None:
        if self.hs is None:
            self._deliver(lambda: self.parser.receive_data(data))
            return
        try:
            self._handshake(data)
        except NBDError as err:
            self._fail(err)

    def _deliver(self, parse: Callable[[], list[ReplyEvent]]) -> None:
        try:
            for event in parse():
                self.client._on_reply(event)
        except NBDError as err:
            self._fail(err)

    def _handshake(self, data: bytes | memoryview) -> None:
        hs = self.hs
        assert hs is not None and self.transport is not None
        hs.receive_data(bytes(data))
        event = hs.next_event()
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        if event is NEED_DATA:
            return
        self.hs = None
        if not self.handshake_done.done():
            self.handshake_done.set_result(event)  # type: ignore[arg-type]
        leftover = hs.leftover()
        if leftover:
            self.data_received(leftover)

    def _fail(self, err: NBDError) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(err)
        self.client._connection_failed(self, err)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        if self.hs is not None:
            try:
                self.hs.receive_data(b"")
            except ProtocolError as err:
                self._fail(err)
        return False

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()  # wake writers; they find the transport closing
        self._end_splice()
        err = NBDConnectionError(
            f"connection to the NBD server was lost{f': {exc}' if exc else ''}"
        )
        if self._waiter is not None:
            self._waiter.fail(err)  # a write splicing its data waits no longer
            self._waiter.close()
        if not self.handshake_done.done():
            self.handshake_done.set_exception(err)
        self.client._connection_failed(self, err)

    # --- a whole read's data spliced into its pipe (NBDClient.read_piped) ----------

    def _check_splice(self) -> None:
        """If the rest of the stream's next bytes are a piped read's data, in one
        piece: move them into its pipe with splice(2) instead of receiving them."""
        due = self.parser.whole_read_due()
        if due is None or self._waiter is None or self.transport is None:
            return
        cookie, placed = due
        pending = self.client._pending.get(cookie)
        if pending is None or pending.pipe is None or pending.buf is None:
            return
        into = self.parser.want_into()
        assert into is not None
        try:  # what arrived with the header first (a few KiB at most), into an empty pipe
            ok = not placed or os.write(pending.pipe[1], memoryview(pending.buf)[:placed]) == placed
        except OSError:
            ok = False
        if not ok:  # the data is received into the buffer as usual
            self._drop_pipe(pending, emptied=False)
            return
        self._splicing = _Splice(pending, placed, len(into))
        self.transport.pause_reading()
        self._splice_more()

    def _splice_more(self) -> None:
        sp = self._splicing
        if sp is None:
            return
        assert sp.pending.pipe is not None and self._waiter is not None
        fd = self._waiter.sock.fileno()  # the duplicate: the transport's own may be closed already
        try:
            n, state = splice_in(fd, sp.pending.pipe[1], sp.left)
        except OSError as err:
            self._end_splice()
            self._fail(NBDConnectionError(f"the connection to the NBD server failed: {err}"))
            return
        sp.left -= n
        sp.moved += n
        if state == WAIT:
            if not sp.watching:
                sp.watching = True
                self._waiter.when_readable(self._splice_more)
            return
        self._end_splice()
        if state == FULL:  # the data is there but the pipe takes no more
            self._give_up_pipe(sp)
            return
        if state == EOF:
            self._fail(NBDConnectionError("the NBD server closed the connection in the middle of a read"))
            return
        sp.pending.spliced = True
        self.client.spliced += 1
        self._deliver(lambda: self.parser.received_into(sp.moved))
        self._resume()

    def _give_up_pipe(self, sp: _Splice) -> None:
        """Back to receiving into the read's buffer: what is in the pipe (its first
        bytes, in order) goes there first, and the pipe goes back to the pool."""
        pending = sp.pending
        pipe = pending.pipe
        assert pipe is not None and pending.buf is not None
        view = memoryview(pending.buf)
        have, pos = sp.placed + sp.moved, 0
        try:
            while pos < have:
                pos += os.readv(pipe[0], [view[pos:have]])
        except OSError as err:
            self._fail(NBDConnectionError(f"could not read back a read's data from its pipe: {err}"))
            return
        self._drop_pipe(pending, emptied=True)
        self.client.splice_refills += 1
        if sp.moved:
            self._deliver(lambda: self.parser.received_into(sp.moved))
        self._resume()

    def _drop_pipe(self, pending: _Pending, emptied: bool) -> None:
        assert pending.pipe is not None
        POOL.give(pending.pipe, emptied)
        pending.pipe = None
        self.client._piped -= 1

    def _end_splice(self) -> None:
        sp, self._splicing = self._splicing, None
        if sp is not None and sp.watching and self._waiter is not None:
            self._waiter.stop_reading()

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


@dataclass(slots=True)
class _PipeHold:
    """A pipe on its way to a read request: ``taken`` once the request owns it."""

    fds: tuple[int, int]
    taken: bool = False


@dataclass(slots=True)
class _Splice:
    """A read's data on its way from the socket into its pipe."""

    pending: _Pending
    placed: int  # bytes that arrived with the header (written into the pipe first)
    left: int  # bytes still to splice
    moved: int = 0  # bytes spliced so far
    watching: bool = False  # waiting for the socket to be readable


async def _open(address: Address, client: NBDClient, hs: ClientHandshake) -> _Link:
    loop = asyncio.get_running_loop()
    if isinstance(address, str):
        _, link = await loop.create_unix_connection(lambda: _Link(client, hs), address)
    else:
        _, link = await loop.create_connection(lambda: _Link(client, hs), address[0], address[1])
        sock = link.transport.get_extra_info("socket") if link.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return link


async def list_exports(address: Address, *, timeout_s: float = 10.0) -> list[str]:
    """Names the server offers (NBD_OPT_LIST)."""
    client = NBDClient(address, "", ClientSettings(connect_timeout_s=timeout_s))
    result = await client._negotiate(ClientHandshake("", list_exports=True))
    assert isinstance(result, ExportList)
    return result.names


async def preempt(address: Address, holder: str, below: int, *, timeout_s: float = 10.0) -> None:
    """Fence ``holder``: abort its connections registered with a key below ``below``.

    Returns once the server has acknowledged, which it does only after those
    connections are closed and the requests they had already started have
    completed: from then on nothing they sent can land. Raises
    :class:`FencingUnsupported` if the server is not shoal's, and
    :class:`NBDConnectionError` if the acknowledgement does not come within
    ``timeout_s`` (the fencing may then still be under way: do not rely on it).
    """
    order = PreemptOrder(check_holder(holder), check_key("below", below))
    client = NBDClient(address, "", ClientSettings(connect_timeout_s=timeout_s))
    hs = ClientHandshake("", preempt=order, target=client.address_text())
    what = f"preempting holder {holder} below key {below} at {client.address_text()}"
    result = await client._negotiate(hs, what=what)
    assert isinstance(result, Preempted)


class NBDClient:
    """A connection to one export. Use :meth:`connect`; close with :meth:`close`."""

    def __init__(
        self,
        address: Address,
        export: str,
        settings: ClientSettings | None = None,
        *,
        allocation: bool = False,
        register: tuple[str, int] | None = None,
    ):
        self.address = address
        self.export = export
        self.settings = settings or ClientSettings()
        self.allocation = allocation
        #: sent as NBD_OPT_SHOAL_REGISTER on every connection opened
        self.registration = (
            None
            if register is None
            else Registration(check_holder(register[0]), check_key("key", register[1]))
        )
        self.size = 0
        self.flags = TxFlag(0)
        self.structured = False
        self.block_sizes: BlockSizes | None = None
        self._context: int | None = None
        self._link: _Link | None = None
        self._pending: dict[int, _Pending] = {}
        self._piped = 0  # reads in flight that have a pipe
        #: piped reads whose data was spliced, and those whose pipe filled up first
        self.spliced = 0
        self.splice_refills = 0
        #: writes whose data was spliced from a pipe (write_piped)
        self.spliced_writes = 0
        self._cookies = itertools.count(1)
        self._in_flight = 0
        self._queued: collections.deque[asyncio.Future[None]] = collections.deque()
        self._failure: NBDError | None = None
        self._closing = False
        self._watchdog: asyncio.TimerHandle | None = None

    # --- lifecycle --------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: Address,
        export: str,
        settings: ClientSettings | None = None,
        *,
        allocation: bool = False,
        register: tuple[str, int] | None = None,
    ) -> NBDClient:
        """Connect; with ``register=(holder, key)`` the connection is registered for fencing."""
        client = cls(address, export, settings, allocation=allocation, register=register)
        await client._establish()
        return client

    async def _negotiate(
        self, hs: ClientHandshake, *, what: str = ""
    ) -> Ready | ExportList | Preempted:
        """Connect and run ``hs``; a listing or a preempt closes the connection, a GO keeps it."""
        link: _Link | None = None
        timeout_s = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                link = await _open(self.address, self, hs)
                result = await link.handshake_done
        except TimeoutError as err:
            _abort_link(link)
            what = what or f"connecting to {self._where()}"
            raise NBDConnectionError(f"{what} did not complete within {timeout_s:g} s") from err
        except OSError as err:
            raise NBDConnectionError(
                f"cannot connect to {self._where()}: {err.strerror or err}"
            ) from err
        except BaseException:
            _abort_link(link)
            raise
        if isinstance(result, Ready):
            self._link = link
        elif link.transport is not None:
            link.transport.close()  # after NBD_OPT_ABORT has gone out
        return result

    async def _establish(self) -> None:
        hs = ClientHandshake(
            self.export,
            allocation=self.allocation,
            register=self.registration,
            target=self.address_text(),
        )
        ready = await self._negotiate(hs)
        assert isinstance(ready, Ready)
        self.size = ready.size
        self.flags = ready.flags
        self.structured = ready.structured
        self.block_sizes = ready.block_sizes
        self._context = ready.allocation_context
        self._failure = None
        self._closing = False

    async def reconnect(self, *, key: int | None = None) -> None:
        """Abort the current connection (if any) and open a new one, retrying.

        A registered client registers again, with the same key unless ``key``
        gives a new one. :class:`NBDFenced` and :class:`FencingUnsupported` are
        raised at once: another attempt would be refused the same way.
        """
        if key is not None:
            if self.registration is None:
                raise LocalProtocolError(
                    "reconnect(key=...) is for a client made with register=(holder, key)"
                )
            self.registration = Registration(self.registration.holder, check_key("key", key))
        self.abort("reconnecting")
        last: NBDError | None = None
        for attempt in range(self.settings.reconnect_attempts):
            if attempt:
                delay = self.settings.reconnect_delay_s * (2 ** (attempt - 1))
                await asyncio.sleep(min(delay, self.settings.reconnect_max_delay_s))
            try:
                await self._establish()
                return
            except NBDConnectionError as err:
                last = err
                log.info(
                    "nbd client: reconnect attempt %d to %s failed: %s",
                    attempt + 1,
                    self._where(),
                    err,
                )
        raise NBDConnectionError(
            f"cannot reconnect to {self._where()} after {self.settings.reconnect_attempts} attempts: {last}"
        ) from last

    def abort(self, reason: str = "aborted", error: NBDError | None = None) -> dict[str, int]:
        """Abortive close. Returns ``{"discarded": n, "in_flight": m}``.

        ``discarded`` requests never left this process; ``in_flight`` ones were
        (at least partly) sent and their outcome is unknown. Every waiter fails with
        ``error`` (default: ConnectionAborted with ``reason``).
        """
        link, self._link = self._link, None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        err = error or ConnectionAborted(f"NBD connection to {self._where()} was aborted ({reason})")
        self._failure = err
        if link is not None:
            link._end_splice()  # before any pipe it splices into is closed
        if link is not None and link.transport is not None:
            sock = link.transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):  # RST: the kernel drops its send queue too
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            link.transport.abort()  # drops asyncio's unsent buffer
        discarded = 0
        while self._queued:
            waiter = self._queued.popleft()
            if not waiter.done():
                waiter.set_exception(err)
                discarded += 1
        in_flight = len(self._pending)  # sent (even if their caller gave up): fate unknown
        self._fail_pending(err)
        return {"discarded": discarded, "in_flight": in_flight}

    async def close(self) -> None:
        """Graceful close: wait for requests in flight, send NBD_CMD_DISC."""
        link = self._link
        if link is None:
            return
        # refuse new requests from now on: one submitted while we wait below would be
        # sent on a link we are about to close and never answered
        self._closing = True
        if self._pending:
            with contextlib.suppress(NBDError):
                await asyncio.gather(
                    *(p.future for p in list(self._pending.values())), return_exceptions=True
                )
        if link.transport is not None and not link.transport.is_closing():
            link.transport.write(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            link.transport.close()
        self._link = None
        self._failure = ConnectionAborted(f"NBD connection to {self._where()} is closed")

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._link is not None

    # --- commands ---------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(await self.read_buffer(offset, length))

    async def read_buffer(self, offset: int, length: int) -> bytearray:
        """Like :meth:`read`, without the copy: the buffer the reply was received into."""
        result = await self._request(Cmd.READ, 0, offset, length)
        assert isinstance(result, bytearray)
        return result

    async def read_piped(self, offset: int, length: int) -> Piped | bytearray:
        """Like :meth:`read_buffer`, but the data may be left in a pipe for the caller
        to splice on to a socket (``util.pipes``; the caller must ``release`` it).
        It is, for a read of LARGE_READ bytes up to a pipe's size whose reply brings
        the data in one piece; otherwise (holes or pieces, no pipe to be had, a pipe
        that fills up first, a unix socket) the result is the buffer, as read_buffer's."""
        pipe = POOL.take() if LARGE_READ <= length <= POOL.size and self._fd_ok() else None
        if pipe is None:
            return await self.read_buffer(offset, length)
        hold = _PipeHold(pipe)
        try:
            result = await self._request(Cmd.READ, 0, offset, length, pipe=hold)
        finally:
            if not hold.taken:  # no request took it: never used
                POOL.give(pipe, emptied=True)
        assert isinstance(result, (Piped, bytearray))
        return result

    def _fd_ok(self) -> bool:
        link = self._link
        return link is not None and link._waiter is not None and not isinstance(self.address, str)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        await self._request(Cmd.WRITE, CmdFlag.FUA if fua else 0, offset, len(data), data)

    async def write_piped(self, offset: int, payload: Piped, *, fua: bool = False) -> None:
        """A write whose data waits in a pipe (a block passing through the coordinator):
        the request header, then the data spliced from the pipe to the socket, with no
        copy in this process. The pipe goes back to the pool once all of it has gone;
        if the write fails first, the caller's ``release`` closes it. Over a unix socket
        the data is read out of the pipe and written as :meth:`write` does."""
        flags = CmdFlag.FUA if fua else 0
        if not self._fd_ok():
            await self._request(Cmd.WRITE, flags, offset, len(payload), drain_pipe(payload))
            return
        await self._request(Cmd.WRITE, flags, offset, len(payload), piped=payload)
        self.spliced_writes += 1

    async def flush(self) -> None:
        await self._request(Cmd.FLUSH, 0, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(Cmd.TRIM, CmdFlag.FUA if fua else 0, offset, length)

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        flags = (CmdFlag.NO_HOLE if no_hole else 0) | (CmdFlag.FUA if fua else 0)
        await self._request(Cmd.WRITE_ZEROES, flags, offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` runs ``(length, flags)`` from ``offset`` (connect with allocation=True)."""
        if self._context is None:
            raise LocalProtocolError(
                "base:allocation was not negotiated; connect with allocation=True"
            )
        result = await self._request(Cmd.BLOCK_STATUS, 0, offset, length)
        assert isinstance(result, list)
        return result

    async def raw_request(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes = b""
    ) -> object:
        """Send any request, even one the server should refuse (for tests)."""
        return await self._request(cmd, flags, offset, length, payload)

    async def _request(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview = b"",
        *,
        pipe: _PipeHold | None = None,
        piped: Piped | None = None,
    ) -> object:
        # no asyncio.timeout per request (it costs a tenth of a small read): the
        # watchdog below aborts the connection when the oldest request is too old
        return await self._submit(cmd, flags, offset, length, payload, pipe, piped)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(
                self.settings.request_timeout_s / 4, self._check_timeouts)

    def _check_timeouts(self) -> None:
        """Every request_timeout_s/4 while requests are out: the oldest one (the first
        in ``_pending``, which keeps sending order) past the timeout aborts the
        connection; every request fails with RequestTimeout."""
        self._watchdog = None
        oldest = next(iter(self._pending.values()), None)
        if oldest is None:
            return
        timeout = self.settings.request_timeout_s
        if asyncio.get_running_loop().time() - oldest.started >= timeout:
            what = _name(oldest.cmd)
            self.abort(f"{what} timed out", RequestTimeout(
                f"NBD {what} at {oldest.offset} took longer than {timeout:g} s; the connection was aborted"))
            return
        self._arm_watchdog()

    async def _submit(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview,
        pipe: _PipeHold | None = None,
        piped: Piped | None = None,
    ) -> object:
        """``pipe``: a pipe a read's data may be spliced into; ``piped``: a write's data,
        waiting in a pipe (``payload`` is then empty)."""
        if self._link is None:
            raise self._failure or NBDConnectionError(f"not connected to {self._where()}")
        if self._closing:
            raise ConnectionAborted(f"NBD connection to {self._where()} is closing")
        if self._in_flight >= self.settings.max_in_flight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queued.append(waiter)
            try:
                await waiter  # _release hands its slot over; abort() fails it
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release()  # we were handed a slot but are leaving
                raise
        else:
            self._in_flight += 1
        try:
            link = self._link
            if link is None or link.transport is None:
                raise self._failure or NBDConnectionError(f"not connected to {self._where()}")
            cookie, fut = self._expect(link, cmd, offset, length, pipe)
            header = wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
            if piped is not None:
                try:
                    await _splice_request(link, header, piped)
                except Exception:
                    # a stream cut off mid-payload is unusable; the request fails with
                    # what ended it (a timeout, a lost connection), which abort() gave it
                    if self._link is link or not fut.done():
                        self.abort("a write was cut off while its data was spliced")
                except BaseException:
                    self.abort("a write was cancelled while its data was spliced")
                    raise
            elif len(payload) <= _CORK_MAX and not link.write_lock.locked():
                # queued without yielding: cannot interleave with another request
                link.send_small(header, payload)
            elif len(payload) <= _PIECE and not link.write_lock.locked():
                link.uncork()
                write_together(link.transport, (header, payload))
            else:
                try:
                    await _write_in_pieces(link, header, payload)
                except BaseException:
                    # a request cut off mid-payload leaves the stream unusable
                    self.abort("a request was cancelled while being sent")
                    raise
            # If our caller cancels this await, the entry stays in _pending until
            # the server's reply arrives and is dropped: the connection stays usable.
            try:
                return await fut
            except asyncio.CancelledError:
                late = fut.result() if fut.done() and not fut.cancelled() and not fut.exception() else None
                if isinstance(late, Piped):
                    late.release(emptied=False)  # done, but nobody will take it
                raise
        finally:
            self._release()

    def start_read(self, offset: int, length: int, then: Then) -> bool:
        """Send a small read now, from a callback: no task, nothing awaited.

        ``then(buf, None)`` is called with what :meth:`read_buffer` would return as
        soon as the reply is parsed (from this client's receive callback);
        ``then(None, err)`` with its error, soon after the failure (never from within
        :meth:`abort`). Returns False, having sent nothing, when the read cannot leave
        at once (not connected, closing, every slot taken, a large write being sent):
        the caller awaits read_buffer instead.
        """
        link = self._link
        if (link is None or link.transport is None or self._closing or self._queued
                or self._in_flight >= self.settings.max_in_flight or link.write_lock.locked()):
            return False
        self._in_flight += 1
        cookie = self._expect(link, _READ, offset, length, None, then)[0]
        link.send_small(_pack_request(REQUEST_MAGIC, 0, _READ, cookie, offset, length), b"")
        return True

    def _expect(self, link: _Link, cmd: int, offset: int, length: int, pipe: _PipeHold | None,
                then: Then | None = None) -> tuple[int, asyncio.Future[object]]:
        """A new request's cookie and the future its reply completes (the caller sends it)."""
        cookie = next(self._cookies)
        loop = link.loop
        fut: asyncio.Future[object] = loop.create_future()
        pending = _Pending(cmd, offset, fut, loop.time(), then=then)
        if cmd == _READ:
            pending.buf = unzeroed(length)  # the parser zeroes what the reply leaves unfilled
            link.parser.expect_read(cookie, offset, length, pending.buf, stale=True)
            if pipe is not None:  # the request's until it is done
                pending.pipe, pipe.taken = pipe.fds, True
                self._piped += 1
        self._pending[cookie] = pending
        self._arm_watchdog()
        return cookie, fut

    def _release(self) -> None:
        while self._queued:
            waiter = self._queued.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._in_flight -= 1

    # --- replies ----------------------------------------------------------

    def _on_reply(self, ev: ReplyEvent) -> None:
        pending = self._pending.get(ev.cookie)
        if pending is None:
            raise RemoteProtocolError(f"reply for unknown cookie {ev.cookie}")
        if ev.error:
            if not pending.error:
                pending.error, pending.message = ev.error, ev.message
        elif ev.data and pending.buf is not None:
            start = ev.offset - pending.offset
            if start < 0 or start + len(ev.data) > len(pending.buf):
                raise RemoteProtocolError("read reply chunk lies outside the request")
            pending.buf[start : start + len(ev.data)] = ev.data
        elif ev.extents:
            pending.extents = (pending.extents or []) + ev.extents
        if not ev.done:
            return
        del self._pending[ev.cookie]
        result: object = pending.buf
        pipe = pending.pipe
        if pipe is not None:
            self._piped -= 1
            if pending.spliced and not pending.error and not pending.future.done():
                assert pending.buf is not None
                result = Piped(POOL, pipe, len(pending.buf))  # the caller's now
            else:  # unused (the data came in pieces), or nobody will take it
                POOL.give(pipe, emptied=not pending.spliced)
        if pending.error:
            self._settle(pending, None, NBDCommandError(_name(pending.cmd), pending.error, pending.message))
        elif pending.cmd == _READ:
            self._settle(pending, result, None)
        elif pending.cmd == _BLOCK_STATUS:
            self._settle(pending, pending.extents or [], None)
        else:
            self._settle(pending, None, None)

    def _settle(self, pending: _Pending, result: object, err: NBDError | None) -> None:
        """Hand a finished request's outcome to whoever waits for it."""
        then = pending.then
        if then is None:
            if pending.future.done():  # abandoned by a cancelled caller
                return
            if err is not None:
                pending.future.set_exception(err)
            else:
                pending.future.set_result(result)
            return
        # a start_read: the future only marks it done (close() waits for it)
        if not pending.future.done():
            pending.future.set_result(None)
        self._release()
        if err is None:
            try:
                then(result, None)
            except Exception:  # noqa: BLE001 - the caller's bug must not break this stream
                log.exception("nbd client: the callback of a read from %s failed", self._where())
        else:  # later: a failure is met inside abort(), which its handler may call again
            asyncio.get_running_loop().call_soon(then, None, err)

    def _connection_failed(self, link: _Link, err: NBDError) -> None:
        link._end_splice()  # before any pipe it splices into is closed
        if link is not self._link:
            return
        log.warning("nbd client: connection to %s failed: %s", self._where(), err)
        self._link = None
        self._failure = err
        self._fail_pending(err)

    def _fail_pending(self, err: NBDError) -> None:
        pendings = list(self._pending.values())
        self._pending.clear()
        self._piped = 0
        for pending in pendings:
            if pending.pipe is not None:
                POOL.give(pending.pipe, emptied=False)
                pending.pipe = None
            self._settle(pending, None, err)

    def address_text(self) -> str:
        if isinstance(self.address, str):
            return self.address
        return f"{self.address[0]}:{self.address[1]}"

    def _where(self) -> str:
        return f"{self.address_text()} export {self.export!r}"


def _name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


_PIECE = 256 * 1024
_SCRATCH = 256 * 1024  # receive buffer for everything but the data of reads
_CORK_MAX = 64 * 1024  # larger payloads are written at once, not copied into the cork
#: corked requests that leave at once without waiting for the end of the loop iteration:
#: one write per 16 queued 4 KiB reads made the client and the server take turns; in
#: fours they overlap (4 KiB reads at depth 16 on 2 cores: ~10% faster)
_CORK_REQUESTS = 4


async def _write_in_pieces(
    link: _Link, header: bytes, payload: bytes | bytearray | memoryview
) -> None:
    """Write one request, yielding to flow control between pieces of its payload."""
    async with link.write_lock:
        transport = link.transport
        assert transport is not None
        link.uncork()
        view = memoryview(payload)
        write_together(transport, (header, view[:_PIECE]))
        for pos in range(_PIECE, len(view), _PIECE):
            await link.writable.wait()
            if transport.is_closing():
                return  # aborted: the request's future carries the error
            transport.write(view[pos : pos + _PIECE])


async def _splice_request(link: _Link, header: bytes, payload: Piped) -> None:
    """Write one request whose payload waits in a pipe: the header (``send_head``:
    straight on the socket with MSG_MORE, or after what the transport holds), then the
    payload spliced from the pipe to the socket."""
    async with link.write_lock:
        transport, waiter = link.transport, link._waiter
        if transport is None or waiter is None or transport.is_closing():
            raise NBDConnectionError("the connection to the NBD server is closed")
        link.uncork()
        await send_piped(transport, waiter, header, payload)
    payload.release(emptied=True)


def _abort_link(link: _Link | None) -> None:
    if link is not None and link.transport is not None:
        link.transport.abort()
