"""Server side of the fixed-newstyle handshake, without I/O.

Feed received bytes with :meth:`ServerHandshake.receive_data`, take what to
send with :meth:`data_to_send`, and poll :meth:`next_event` until it returns
an event other than ``NEED_DATA``::

    S: greeting        NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
    C: client flags    (unknown bits -> RemoteProtocolError: hard disconnect)
    C: option*         each answered here, or through a question to the caller
    -> Negotiated      after NBD_OPT_GO's ACK or NBD_OPT_EXPORT_NAME's reply
    -> Aborted         after NBD_OPT_ABORT (we ACK it first)
    -> Refused         NBD_OPT_EXPORT_NAME of an unknown export (spec: terminate)
    -> Closed          clean EOF between options

Questions. The handshake knows no exports and no fencing state. An option that
needs them makes :meth:`next_event` return a question, and the handshake waits
(calling :meth:`next_event` again is a :class:`LocalProtocolError`) until the
caller answers; the caller may take its time (an async export lookup, waiting
for fenced I/O to finish). Bytes received meanwhile are kept for later.

==================  ===============================  ===============================
question            asked by                         answered with
==================  ===============================  ===============================
``LookupExport``    GO, INFO, EXPORT_NAME,           ``answer_export(info | None)``
                    LIST/SET_META_CONTEXT
``ListExports``     LIST                             ``answer_names(names)``
``Register``        NBD_OPT_SHOAL_REGISTER           ``accept()``
``Preempt``         NBD_OPT_SHOAL_PREEMPT            ``accept()``, once fencing is done
==================  ===============================  ===============================

Any question may instead be answered with ``refuse(rep, message)``: an error
reply, or for EXPORT_NAME (which has no error reply) a ``Refused`` event.

Anything the peer got wrong that the spec lets us answer (bad option length,
unknown option, unknown export in GO/INFO) gets an ``NBD_REP_ERR_*`` reply and
negotiation continues; only breaches that leave the byte stream unusable raise
:class:`RemoteProtocolError`.

States: AWAIT_FLAGS -> OPTIONS <-> ASKING; OPTIONS or ASKING -> DONE (terminal).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from shoal.nbd.fencing import PreemptOrder, Registration, parse_preempt, parse_register

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


@dataclass(frozen=True)
class LookupExport:
    """Which export is ``name``? (asked by ``option``)"""

    name: str
    option: Opt


@dataclass(frozen=True)
class ListExports:
    """Which exports are there?"""


@dataclass(frozen=True)
class Register:
    """May this connection register as ``registration``?"""

    registration: Registration


@dataclass(frozen=True)
class Preempt:
    """Fence ``order``, then accept() (the ACK promises the fencing is complete)."""

    order: PreemptOrder


Question = LookupExport | ListExports | Register | Preempt


class State(enum.Enum):
    AWAIT_FLAGS = "await-flags"
    OPTIONS = "options"
    ASKING = "asking"  # a question is out; the caller's answer continues the option
    DONE = "done"


_TRANSITIONS: dict[State, set[State]] = {
    State.AWAIT_FLAGS: {State.OPTIONS},
    State.OPTIONS: {State.ASKING, State.DONE},
    State.ASKING: {State.OPTIONS, State.DONE},
    State.DONE: set(),
}


@dataclass
class _Meta:
    export: str = ""
    allocation: bool = False


_Continuation = Callable[[Any], "HandshakeEvent | None"]


@dataclass
class ServerHandshake:
    state: State = State.AWAIT_FLAGS
    structured: bool = False
    no_zeroes: bool = False
    #: set once NBD_OPT_SHOAL_REGISTER was accepted
    registration: Registration | None = None
    _in: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _eof: bool = False
    _meta: _Meta = field(default_factory=_Meta)
    _question: Question | None = None
    _then: _Continuation | None = None
    _final: HandshakeEvent | None = None

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

    def next_event(self) -> HandshakeEvent | Question | NeedData:
        if self.state is State.ASKING:
            raise LocalProtocolError(f"answer {self._question} before asking for the next event")
        if self._final is not None:
            final, self._final = self._final, None
            return final
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
            if event is None:
                continue
            if self.state is not State.ASKING:
                self._set_state(State.DONE)
            return event
        raise LocalProtocolError("handshake is over")

    # --- answers to questions -------------------------------------------------

    def answer_export(self, export: ExportInfo | None) -> None:
        """Answer :class:`LookupExport`: the export, or None if there is none by that name."""
        self._answer(LookupExport, export)

    def answer_names(self, names: Iterable[str]) -> None:
        """Answer :class:`ListExports`."""
        self._answer(ListExports, list(names))

    def accept(self) -> None:
        """Answer :class:`Register` or :class:`Preempt` with NBD_REP_ACK."""
        self._answer((Register, Preempt), None)

    def refuse(self, rep: Rep, message: str) -> None:
        """Answer any question with an error reply (EXPORT_NAME: a ``Refused`` event)."""
        question = self._take_answer((LookupExport, ListExports, Register, Preempt))
        if isinstance(question, LookupExport) and question.option == Opt.EXPORT_NAME:
            self._finish(Refused(f"NBD_OPT_EXPORT_NAME of {question.name!r} refused: {message}"))
            return
        self._error(_option_of(question), rep, message)
        self._set_state(State.OPTIONS)

    def _ask(self, question: Question, then: _Continuation) -> Question:
        self._question, self._then = question, then
        self._set_state(State.ASKING)
        return question

    def _take_answer(self, kinds: type | tuple[type, ...]) -> Question:
        question = self._question
        if question is None or self.state is not State.ASKING or not isinstance(question, kinds):
            raise LocalProtocolError(f"no question of that kind is pending (pending: {question})")
        self._question = None
        return question

    def _answer(self, kinds: type | tuple[type, ...], value: object) -> None:
        self._take_answer(kinds)
        then, self._then = self._then, None
        assert then is not None
        self._set_state(State.OPTIONS)
        event = then(value)
        if event is not None:
            self._finish(event)

    def _finish(self, event: HandshakeEvent) -> None:
        self._set_state(State.DONE)
        self._final = event

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
        self._reply(option, rep, _clip_utf8(message, MAX_STRING))

    # --- options ---------------------------------------------------------

    def _option(self, option: int, data: bytes) -> HandshakeEvent | Question | None:
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            return Aborted()
        if option == Opt.LIST:
            return self._list(data)
        if option in (Opt.INFO, Opt.GO):
            return self._info(Opt(option), data)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._meta_context(Opt(option), data)
        if option == Opt.SHOAL_REGISTER:
            return self._register(data)
        if option == Opt.SHOAL_PREEMPT:
            return self._preempt(data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                self._error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, Rep.ERR_INVALID, "structured replies are already negotiated")
            else:
                self.structured = True
                self._reply(option, Rep.ACK)
        elif option == Opt.STARTTLS:
            self._error(option, Rep.ERR_UNSUP, "this server does not support TLS")
        else:
            self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        return None

    def _export_name(self, data: bytes) -> HandshakeEvent | Question:
        name = _decode(data)
        if name is None:
            return Refused(f"NBD_OPT_EXPORT_NAME asked for unknown export {data[:256]!r}")

        def then(export: ExportInfo | None) -> HandshakeEvent:
            if export is None:
                return Refused(f"NBD_OPT_EXPORT_NAME asked for unknown export {data[:256]!r}")
            flags = export.flags | TxFlag.HAS_FLAGS
            self._out += wire.EXPORT_NAME_REPLY.pack(export.size, flags)
            if not self.no_zeroes:
                self._out += wire.NO_ZEROES_PAD
            return Negotiated(export, flags, structured=False, allocation_context=None)

        return self._ask(LookupExport(name, Opt.EXPORT_NAME), then)

    def _list(self, data: bytes) -> Question | None:
        if data:
            self._error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None

        def then(names: list[str]) -> None:
            for name in names:
                raw = name.encode()
                self._reply(Opt.LIST, Rep.SERVER, wire.U32.pack(len(raw)) + raw)
            self._reply(Opt.LIST, Rep.ACK)

        return self._ask(ListExports(), then)

    def _info(self, option: Opt, data: bytes) -> Question | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return None
        name, requests = parsed
        return self._ask(
            LookupExport(name, option),
            lambda export: self._info_reply(option, name, requests, export),
        )

    def _info_reply(
        self, option: Opt, name: str, requests: set[int], export: ExportInfo | None
    ) -> HandshakeEvent | None:
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
            desc = _clip_utf8(export.description, MAX_STRING)
            self._reply(option, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + desc)
        self._reply(option, Rep.ACK)
        if option != Opt.GO:
            return None
        context = None
        if self.structured and self._meta.allocation and self._meta.export == name:
            context = ALLOCATION_CONTEXT_ID
        return Negotiated(export, flags, structured=self.structured, allocation_context=context)

    def _meta_context(self, option: Opt, data: bytes) -> Question | None:
        if not self.structured:
            self._error(option, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return None
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed meta context request")
            return None
        name, queries = parsed
        return self._ask(
            LookupExport(name, option),
            lambda export: self._meta_reply(option, name, queries, export),
        )

    def _meta_reply(
        self, option: Opt, name: str, queries: list[str], export: ExportInfo | None
    ) -> None:
        if export is None:
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

    def _register(self, data: bytes) -> Question | None:
        option = Opt.SHOAL_REGISTER
        if self.registration is not None:
            reg = self.registration
            self._error(
                option,
                Rep.ERR_INVALID,
                f"this connection is already registered as holder {reg.holder} key {reg.key}",
            )
            return None
        try:
            reg = parse_register(data)
        except ValueError as err:
            self._error(option, Rep.ERR_INVALID, f"malformed NBD_OPT_SHOAL_REGISTER: {err}")
            return None

        def then(_: None) -> None:
            self.registration = reg
            self._reply(option, Rep.ACK)

        return self._ask(Register(reg), then)

    def _preempt(self, data: bytes) -> Question | None:
        option = Opt.SHOAL_PREEMPT
        try:
            order = parse_preempt(data)
        except ValueError as err:
            self._error(option, Rep.ERR_INVALID, f"malformed NBD_OPT_SHOAL_PREEMPT: {err}")
            return None
        return self._ask(Preempt(order), lambda _: self._reply(option, Rep.ACK))


def _option_of(question: Question) -> int:
    if isinstance(question, LookupExport):
        return question.option
    if isinstance(question, ListExports):
        return Opt.LIST
    if isinstance(question, Register):
        return Opt.SHOAL_REGISTER
    return Opt.SHOAL_PREEMPT


def _clip_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes, never cut inside a character."""
    return text.encode()[:limit].decode(errors="ignore").encode()


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
