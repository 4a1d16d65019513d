"""Server side of the fixed-newstyle handshake, without I/O.

Feed received bytes with :meth:`ServerHandshake.receive_data`, take what to
send with :meth:`data_to_send`, and poll :meth:`next_event` until it returns
an event other than ``NEED_DATA``::

    S: greeting        NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
    C: client flags    (unknown bits -> RemoteProtocolError: hard disconnect)
    C: option*         each answered here; export lookups go to ``catalog``
    -> Negotiated      after NBD_OPT_GO's ACK or NBD_OPT_EXPORT_NAME's reply
    -> Aborted         after NBD_OPT_ABORT (we ACK it first)
    -> Refused         NBD_OPT_EXPORT_NAME of an unknown export (spec: terminate)
    -> Closed          clean EOF between options

Anything the peer got wrong that the spec lets us answer (bad option length,
unknown option, unknown export in GO/INFO) gets an ``NBD_REP_ERR_*`` reply and
negotiation continues; only breaches that leave the byte stream unusable raise
:class:`RemoteProtocolError`.

States: AWAIT_FLAGS -> OPTIONS -> DONE (terminal).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from shoal.nbd import wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from shoal.nbd.errors import LocalProtocolError, RemoteProtocolError

#: context id we give ``base:allocation`` in NBD_OPT_SET_META_CONTEXT
ALLOCATION_CONTEXT_ID = 1


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: TxFlag  # without SEND_DF, which depends on structured replies
    block_sizes: BlockSizes = BlockSizes()
    description: str = ""


class ExportCatalog(Protocol):
    def lookup(self, name: str) -> ExportInfo | None: ...

    def names(self) -> Iterable[str]: ...


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True)
class Negotiated:
    """Transmission begins on ``export``."""

    export: ExportInfo
    flags: TxFlag  # as sent to the client
    structured: bool
    allocation_context: int | None  # context id of base:allocation, if selected


@dataclass(frozen=True)
class Aborted:
    """The client sent NBD_OPT_ABORT; we replied; close the connection."""


@dataclass(frozen=True)
class Refused:
    """NBD_OPT_EXPORT_NAME named an export we cannot serve; close the connection."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The client closed the connection between options."""


HandshakeEvent = Negotiated | Aborted | Refused | Closed


class State(enum.Enum):
    AWAIT_FLAGS = "await-flags"
    OPTIONS = "options"
    DONE = "done"


_TRANSITIONS: dict[State, set[State]] = {
    State.AWAIT_FLAGS: {State.OPTIONS},
    State.OPTIONS: {State.DONE},
    State.DONE: set(),
}


@dataclass
class _Meta:
    export: str = ""
    allocation: bool = False


@dataclass
class ServerHandshake:
    catalog: ExportCatalog
    state: State = State.AWAIT_FLAGS
    structured: bool = False
    no_zeroes: bool = False
    _in: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _eof: bool = False
    _meta: _Meta = field(default_factory=_Meta)

    def __post_init__(self) -> None:
        self._out += wire.GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # --- I/O surface ------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; ``b""`` means end of file."""
        if self.state is State.DONE:
            raise LocalProtocolError("handshake is over; feed transmission data elsewhere")
        if not data:
            self._eof = True
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (early requests)."""
        return bytes(self._in)

    def next_event(self) -> HandshakeEvent | NeedData:
        while self.state is not State.DONE:
            if self.state is State.AWAIT_FLAGS:
                if len(self._in) < 4:
                    return self._need(4)
                (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in)
                del self._in[:4]
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise RemoteProtocolError(f"client sent unknown client flags {flags:#x}")
                self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
                self._set_state(State.OPTIONS)
                continue
            if len(self._in) < wire.OPTION_HEADER.size:
                if not self._in and self._eof:
                    self._set_state(State.DONE)
                    return Closed()
                return self._need(wire.OPTION_HEADER.size)
            magic, option, length = wire.OPTION_HEADER.unpack_from(self._in)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(
                    f"option {option} carries {length} bytes; limit is {MAX_OPTION_LENGTH}"
                )
            end = wire.OPTION_HEADER.size + length
            if len(self._in) < end:
                return self._need(end)
            data = bytes(self._in[wire.OPTION_HEADER.size : end])
            del self._in[:end]
            event = self._option(option, data)
            if event is not None:
                self._set_state(State.DONE)
                return event
        raise LocalProtocolError("handshake is over")

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise LocalProtocolError(f"handshake cannot go from {self.state.value} to {new.value}")
        self.state = new

    def _need(self, n: int) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(
                f"client disconnected mid-handshake ({len(self._in)} of {n} bytes of the next message)"
            )
        return NEED_DATA

    # --- replies ---------------------------------------------------------

    def _reply(self, option: int, rep: int, payload: bytes = b"") -> None:
        self._out += wire.OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(payload))
        self._out += payload

    def _error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, message.encode()[:MAX_STRING])

    # --- options ---------------------------------------------------------

    def _option(self, option: int, data: bytes) -> HandshakeEvent | None:
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            return Aborted()
        if option == Opt.LIST:
            self._list(data)
        elif option in (Opt.INFO, Opt.GO):
            return self._info(option, data)
        elif option == Opt.STRUCTURED_REPLY:
            if data:
                self._error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, Rep.ERR_INVALID, "structured replies are already negotiated")
            else:
                self.structured = True
                self._reply(option, Rep.ACK)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option == Opt.STARTTLS:
            self._error(option, Rep.ERR_UNSUP, "this server does not support TLS")
        else:
            self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        return None

    def _export_name(self, data: bytes) -> HandshakeEvent:
        name = _decode(data)
        export = self.catalog.lookup(name) if name is not None else None
        if export is None:
            return Refused(f"NBD_OPT_EXPORT_NAME asked for unknown export {data[:256]!r}")
        flags = export.flags | TxFlag.HAS_FLAGS
        self._out += wire.EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += wire.NO_ZEROES_PAD
        return Negotiated(export, flags, structured=False, allocation_context=None)

    def _list(self, data: bytes) -> None:
        if data:
            self._error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for name in self.catalog.names():
            raw = name.encode()
            self._reply(Opt.LIST, Rep.SERVER, wire.U32.pack(len(raw)) + raw)
        self._reply(Opt.LIST, Rep.ACK)

    def _info(self, option: int, data: bytes) -> HandshakeEvent | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return None
        name, requests = parsed
        export = self.catalog.lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"there is no export named {name!r}")
            return None
        flags = export.flags | TxFlag.HAS_FLAGS
        if self.structured:
            flags |= TxFlag.SEND_DF
        self._reply(option, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        bs = export.block_sizes
        self._reply(
            option,
            Rep.INFO,
            wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, bs.minimum, bs.preferred, bs.maximum),
        )
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, wire.U16.pack(Info.NAME) + name.encode())
        if Info.DESCRIPTION in requests and export.description:
            desc = export.description.encode()[:MAX_STRING]
            self._reply(option, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + desc)
        self._reply(option, Rep.ACK)
        if option != Opt.GO:
            return None
        context = None
        if self.structured and self._meta.allocation and self._meta.export == name:
            context = ALLOCATION_CONTEXT_ID
        return Negotiated(export, flags, structured=self.structured, allocation_context=context)

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._error(option, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        if self.catalog.lookup(name) is None:
            self._error(option, Rep.ERR_UNKNOWN, f"there is no export named {name!r}")
            return
        listing = option == Opt.LIST_META_CONTEXT
        if listing:
            match = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        else:
            match = BASE_ALLOCATION in queries
            self._meta = _Meta(export=name, allocation=match)
        if match:
            ctx = 0 if listing else ALLOCATION_CONTEXT_ID
            self._reply(option, Rep.META_CONTEXT, wire.U32.pack(ctx) + BASE_ALLOCATION.encode())
        self._reply(option, Rep.ACK)


def _decode(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _take_string(data: bytes, pos: int) -> tuple[str, int] | None:
    """A 32-bit length and that many bytes of UTF-8, or None if malformed."""
    if pos + 4 > len(data):
        return None
    (n,) = wire.U32.unpack_from(data, pos)
    pos += 4
    if pos + n > len(data):
        return None
    text = _decode(data[pos : pos + n])
    return None if text is None else (text, pos + n)


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    got = _take_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if pos + 2 > len(data):
        return None
    (count,) = wire.U16.unpack_from(data, pos)
    pos += 2
    if pos + 2 * count != len(data):
        return None
    return name, {wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    got = _take_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if pos + 4 > len(data):
        return None
    (count,) = wire.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        item = _take_string(data, pos)
        if item is None:
            return None
        query, pos = item
        queries.append(query)
    if pos != len(data):
        return None
    return name, queries
