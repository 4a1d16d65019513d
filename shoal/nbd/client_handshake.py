"""Client side of the fixed-newstyle handshake, without I/O.

The client asks, one option at a time (the spec forbids pipelining options)::

    C: client flags (FIXED_NEWSTYLE, NO_ZEROES if offered)
    C: NBD_OPT_SHOAL_REGISTER            if registering (fencing, docs/NBD.md)
    C: NBD_OPT_STRUCTURED_REPLY          if wanted
    C: NBD_OPT_SET_META_CONTEXT          base:allocation, if wanted and structured
    C: NBD_OPT_GO                        asks for NBD_INFO_BLOCK_SIZE
       (NBD_REP_ERR_UNSUP -> NBD_OPT_EXPORT_NAME, for old servers)
    -> Ready

or, to list exports: ``NBD_OPT_LIST`` then ``NBD_OPT_ABORT`` -> ExportList;
or, to fence a holder: ``NBD_OPT_SHOAL_PREEMPT`` then ``NBD_OPT_ABORT`` -> Preempted.

An error reply to GO raises :class:`HandshakeRefused` with the server's message.
REGISTER refused with ``NBD_REP_ERR_POLICY`` raises :class:`NBDFenced`; either
fencing option answered with ``NBD_REP_ERR_UNSUP`` (a server that is not
shoal's, e.g. qemu-nbd) raises :class:`FencingUnsupported`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shoal.nbd import wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REP_ERR,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from shoal.nbd.errors import (
    FencingUnsupported,
    HandshakeRefused,
    NBDError,
    NBDFenced,
    RemoteProtocolError,
)
from shoal.nbd.fencing import PreemptOrder, Registration, encode_preempt, encode_register
from shoal.nbd.server_handshake import NEED_DATA, NeedData


@dataclass(frozen=True)
class Ready:
    size: int
    flags: TxFlag
    structured: bool
    allocation_context: int | None
    block_sizes: BlockSizes | None


@dataclass(frozen=True)
class ExportList:
    names: list[str]


@dataclass(frozen=True)
class Preempted:
    """The server acknowledged the PREEMPT: the fencing is complete."""

    order: PreemptOrder


class Step(enum.Enum):
    GREETING = "greeting"
    OPTION = "option"
    EXPORT_NAME = "export-name"
    DONE = "done"


@dataclass
class ClientHandshake:
    export: str
    structured: bool = True
    allocation: bool = False
    list_exports: bool = False
    register: Registration | None = None
    preempt: PreemptOrder | None = None
    #: names the server in error messages (the client passes its address)
    target: str = "the server"
    step: Step = Step.GREETING
    _in: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _option: int = 0
    _no_zeroes: bool = False
    _context: int | None = None
    _names: list[str] = field(default_factory=list)
    _size: int = -1
    _flags: TxFlag = TxFlag(0)
    _block_sizes: BlockSizes | None = None

    def receive_data(self, data: bytes) -> None:
        if not data and self.step is not Step.DONE:
            raise RemoteProtocolError(
                f"server closed the connection during the handshake ({self.step.value})"
            )
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Ready | ExportList | Preempted | NeedData:
        while True:
            if self.step is Step.GREETING:
                if len(self._in) < wire.GREETING.size:
                    return NEED_DATA
                magic, second, flags = wire.GREETING.unpack_from(self._in)
                del self._in[: wire.GREETING.size]
                if magic != NBDMAGIC or second != IHAVEOPT:
                    raise RemoteProtocolError("server does not speak newstyle NBD (bad magic)")
                if not flags & FLAG_FIXED_NEWSTYLE:
                    raise RemoteProtocolError("server does not support fixed newstyle negotiation")
                self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
                cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self._no_zeroes else 0)
                self._out += wire.CLIENT_FLAGS.pack(cflags)
                self.step = Step.OPTION
                if self.list_exports:
                    self._send(Opt.LIST)
                elif self.preempt is not None:
                    self._send(Opt.SHOAL_PREEMPT, encode_preempt(self.preempt))
                elif self.register is not None:
                    self._send(Opt.SHOAL_REGISTER, encode_register(self.register))
                else:
                    self._negotiate_export()
            elif self.step is Step.EXPORT_NAME:
                need = 10 if self._no_zeroes else 134
                if len(self._in) < need:
                    return NEED_DATA
                size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._in)
                del self._in[:need]
                self.step = Step.DONE
                return Ready(size, TxFlag(flags), self.structured, self._context, None)
            elif self.step is Step.OPTION:
                head = wire.OPTION_REPLY.size
                if len(self._in) < head:
                    return NEED_DATA
                magic, option, rep, length = wire.OPTION_REPLY.unpack_from(self._in)
                if magic != OPTION_REPLY_MAGIC or option != self._option:
                    raise RemoteProtocolError(
                        f"bad option reply (magic {magic:#x}, option {option})"
                    )
                if len(self._in) < head + length:
                    return NEED_DATA
                payload = bytes(self._in[head : head + length])
                del self._in[: head + length]
                event = self._on_reply(rep, payload)
                if event is not None:
                    self.step = Step.DONE
                    return event
            else:
                raise RemoteProtocolError("handshake already finished")

    def leftover(self) -> bytes:
        return bytes(self._in)

    def _send(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._out += wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data

    def _negotiate_export(self) -> None:
        if self.structured:
            self._send(Opt.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_go(self) -> None:
        name = self.export.encode()
        self._send(
            Opt.GO,
            wire.U32.pack(len(name)) + name + wire.U16.pack(1) + wire.U16.pack(Info.BLOCK_SIZE),
        )

    def _on_reply(self, rep: int, payload: bytes) -> Ready | ExportList | Preempted | None:
        option = self._option
        if option == Opt.SHOAL_REGISTER:
            if rep == Rep.ACK:
                self._negotiate_export()
                return None
            raise self._fencing_error(option, rep, payload)
        if option == Opt.SHOAL_PREEMPT:
            if rep == Rep.ACK:
                assert self.preempt is not None
                self._send(Opt.ABORT)
                return Preempted(self.preempt)
            raise self._fencing_error(option, rep, payload)
        if option == Opt.LIST:
            if rep == Rep.SERVER and len(payload) >= 4:
                (n,) = wire.U32.unpack_from(payload)
                self._names.append(payload[4 : 4 + n].decode(errors="replace"))
                return None
            if rep == Rep.ACK:
                self._send(Opt.ABORT)
                return ExportList(self._names)
            raise HandshakeRefused(_message("listing exports", rep, payload), reply_type=rep)
        if option == Opt.STRUCTURED_REPLY:
            self.structured = rep == Rep.ACK
            if self.structured and self.allocation:
                name = self.export.encode()
                query = BASE_ALLOCATION.encode()
                self._send(
                    Opt.SET_META_CONTEXT,
                    wire.U32.pack(len(name))
                    + name
                    + wire.U32.pack(1)
                    + wire.U32.pack(len(query))
                    + query,
                )
            else:
                self._send_go()
            return None
        if option == Opt.SET_META_CONTEXT:
            if rep == Rep.META_CONTEXT and len(payload) >= 4:
                if payload[4:].decode(errors="replace") == BASE_ALLOCATION:
                    (self._context,) = wire.U32.unpack_from(payload)
                return None
            self._send_go()
            return None
        if option == Opt.GO:
            return self._on_go_reply(rep, payload)
        raise RemoteProtocolError(f"reply to an option we did not send ({option})")

    def _on_go_reply(self, rep: int, payload: bytes) -> Ready | None:
        if rep == Rep.INFO and len(payload) >= 2:
            (kind,) = wire.U16.unpack_from(payload)
            if kind == Info.EXPORT and len(payload) == wire.INFO_EXPORT.size:
                _, self._size, flags = wire.INFO_EXPORT.unpack(payload)
                self._flags = TxFlag(flags)
            elif kind == Info.BLOCK_SIZE and len(payload) == wire.INFO_BLOCK_SIZE.size:
                _, lo, pref, hi = wire.INFO_BLOCK_SIZE.unpack(payload)
                try:
                    self._block_sizes = BlockSizes(lo, pref, hi)
                except ValueError as err:
                    raise RemoteProtocolError(f"server sent invalid block sizes: {err}") from err
            return None
        if rep == Rep.ACK:
            if self._size < 0:
                raise RemoteProtocolError("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
            return Ready(self._size, self._flags, self.structured, self._context, self._block_sizes)
        if rep == Rep.ERR_UNSUP:
            name = self.export.encode()
            self._out += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, len(name)) + name
            self.step = Step.EXPORT_NAME
            return None
        if rep & REP_ERR:
            raise HandshakeRefused(
                _message(f"opening export {self.export!r}", rep, payload), reply_type=rep
            )
        return None  # unknown non-error reply: ignore, as the spec asks


    def _fencing_error(self, option: int, rep: int, payload: bytes) -> NBDError:
        name = Opt(option).name
        if rep == Rep.ERR_UNSUP:
            return FencingUnsupported(self.target, f"NBD_OPT_{name} {option:#x}")
        reg = self.register
        if option == Opt.SHOAL_REGISTER and rep == Rep.ERR_POLICY and reg is not None:
            text = payload.decode(errors="replace") or f"holder {reg.holder} is fenced"
            return NBDFenced(text, holder=reg.holder, key=reg.key)
        if rep & REP_ERR:
            return HandshakeRefused(_message(f"NBD_OPT_{name}", rep, payload), reply_type=rep)
        return RemoteProtocolError(f"unexpected reply {rep:#x} to NBD_OPT_{name}")


def _message(what: str, rep: int, payload: bytes) -> str:
    try:
        name = Rep(rep).name
    except ValueError:
        name = f"reply {rep:#x}"
    text = payload.decode(errors="replace")
    return f"server refused {what}: {name}" + (f" ({text})" if text else "")
