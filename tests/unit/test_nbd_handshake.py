"""The sans-I/O handshake: our client and server state machines paired in memory,
and hand-written byte sequences for what a bad client can send."""

from __future__ import annotations

import struct

import pytest

from shoal.nbd import wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.client_handshake import ClientHandshake, ExportList, Ready
from shoal.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from shoal.nbd.errors import HandshakeRefused, RemoteProtocolError
from shoal.nbd.server_handshake import (
    ALLOCATION_CONTEXT_ID,
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    ListExports,
    LookupExport,
    Negotiated,
    Refused,
    ServerHandshake,
)

FLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN


class Catalog:
    def __init__(self) -> None:
        self.exports = {
            "disk": ExportInfo("disk", 1 << 20, FLAGS, BlockSizes(512, 4096, 1 << 20), "a disk"),
            "/vm/b.raw": ExportInfo("/vm/b.raw", 4096, FLAGS),
        }

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def names(self) -> list[str]:
        return list(self.exports)


def step(hs: ServerHandshake, catalog: Catalog | None = None) -> object:
    """next_event(), answering the handshake's export questions from ``catalog``."""
    catalog = catalog or Catalog()
    while True:
        event = hs.next_event()
        if isinstance(event, LookupExport):
            hs.answer_export(catalog.lookup(event.name))
        elif isinstance(event, ListExports):
            hs.answer_names(catalog.names())
        else:
            return event


def pair(client: ClientHandshake) -> tuple[object, object]:
    """Pump bytes between the two machines until both produce an event."""
    server = ServerHandshake()
    s_event: object = NEED_DATA
    c_event: object = NEED_DATA
    for _ in range(50):
        data = server.data_to_send()
        if data:
            client.receive_data(data)
        if c_event is NEED_DATA:
            c_event = client.next_event()
        data = client.data_to_send()
        if data and s_event is NEED_DATA:
            server.receive_data(data)
        if s_event is NEED_DATA:
            s_event = step(server)
        if s_event is not NEED_DATA and c_event is not NEED_DATA:
            return s_event, c_event
    raise AssertionError(f"handshake did not finish: server {s_event}, client {c_event}")


def test_go_with_structured_replies_and_allocation() -> None:
    s_ev, c_ev = pair(ClientHandshake("disk", allocation=True))
    assert isinstance(s_ev, Negotiated) and isinstance(c_ev, Ready)
    assert s_ev.export.name == "disk" and s_ev.structured
    assert s_ev.allocation_context == ALLOCATION_CONTEXT_ID == c_ev.allocation_context
    assert c_ev.size == 1 << 20
    assert c_ev.flags & TxFlag.SEND_DF  # DF only once structured replies are on
    assert c_ev.block_sizes == BlockSizes(512, 4096, 1 << 20)


def test_go_without_structured_replies() -> None:
    s_ev, c_ev = pair(ClientHandshake("/vm/b.raw", structured=False))
    assert isinstance(s_ev, Negotiated) and not s_ev.structured
    assert isinstance(c_ev, Ready) and c_ev.size == 4096 and not c_ev.flags & TxFlag.SEND_DF


def test_list_exports_then_abort() -> None:
    s_ev, c_ev = pair(ClientHandshake("", list_exports=True))
    assert isinstance(c_ev, ExportList) and c_ev.names == ["disk", "/vm/b.raw"]
    assert isinstance(s_ev, Aborted)


def test_go_unknown_export_is_refused_with_err_unknown() -> None:
    with pytest.raises(HandshakeRefused) as info:
        pair(ClientHandshake("nope"))
    assert info.value.reply_type == Rep.ERR_UNKNOWN
    assert "nope" in str(info.value)


# --- byte-level conversations --------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def start(no_zeroes: bool = True) -> ServerHandshake:
    hs = ServerHandshake()
    greeting = hs.data_to_send()
    assert wire.GREETING.unpack(greeting) == (NBDMAGIC, IHAVEOPT, 3)
    hs.receive_data(struct.pack(">I", 3 if no_zeroes else 1))
    assert step(hs) is NEED_DATA
    return hs


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(data)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def name_request(name: bytes, infos: list[int]) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def test_info_replies_then_continues() -> None:
    hs = start()
    hs.receive_data(option(Opt.INFO, name_request(b"disk", [Info.NAME, Info.DESCRIPTION])))
    assert step(hs) is NEED_DATA
    got = replies(hs.data_to_send())
    assert [r[1] for r in got] == [Rep.INFO] * 4 + [Rep.ACK]
    assert got[0][2] == wire.INFO_EXPORT.pack(Info.EXPORT, 1 << 20, FLAGS)
    assert got[1][2] == wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 512, 4096, 1 << 20)
    assert got[2][2] == struct.pack(">H", Info.NAME) + b"disk"
    assert got[3][2] == struct.pack(">H", Info.DESCRIPTION) + b"a disk"


@pytest.mark.parametrize(
    "opt, data, rep",
    [
        (99, b"whatever", Rep.ERR_UNSUP),
        (Opt.STARTTLS, b"", Rep.ERR_UNSUP),
        (Opt.EXTENDED_HEADERS, b"", Rep.ERR_UNSUP),
        (Opt.LIST, b"x", Rep.ERR_INVALID),
        (Opt.STRUCTURED_REPLY, b"x", Rep.ERR_INVALID),
        (Opt.GO, b"\x00\x00\x00\x09disk", Rep.ERR_INVALID),  # name length past the data
        (Opt.GO, name_request(b"disk", [1]) + b"\x00", Rep.ERR_INVALID),  # trailing byte
        (Opt.GO, name_request(b"\xff\xfe", []), Rep.ERR_INVALID),  # not UTF-8
        (Opt.INFO, name_request(b"missing", []), Rep.ERR_UNKNOWN),
        (Opt.SET_META_CONTEXT, b"", Rep.ERR_INVALID),  # before structured replies
    ],
)
def test_bad_options_get_error_replies_and_negotiation_goes_on(
    opt: int, data: bytes, rep: int
) -> None:
    hs = start()
    hs.receive_data(option(opt, data))
    assert step(hs) is NEED_DATA
    ((r_opt, r_rep, message),) = replies(hs.data_to_send())
    assert (r_opt, r_rep) == (opt, rep) and message  # every error says why
    hs.receive_data(option(Opt.GO, name_request(b"disk", [])))
    assert isinstance(step(hs), Negotiated)


def test_meta_context_queries() -> None:
    hs = start()
    hs.receive_data(option(Opt.STRUCTURED_REPLY))
    meta = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 2)
    meta += struct.pack(">I", 9) + b"x-other:a" + struct.pack(">I", 15) + b"base:allocation"
    hs.receive_data(
        option(Opt.LIST_META_CONTEXT, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    )
    hs.receive_data(option(Opt.SET_META_CONTEXT, meta))
    assert step(hs) is NEED_DATA
    got = replies(hs.data_to_send())
    assert [(r[0], r[1]) for r in got] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK),
        (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT),
        (Opt.LIST_META_CONTEXT, Rep.ACK),
        (Opt.SET_META_CONTEXT, Rep.META_CONTEXT),
        (Opt.SET_META_CONTEXT, Rep.ACK),
    ]
    assert got[3][2] == struct.pack(">I", ALLOCATION_CONTEXT_ID) + b"base:allocation"
    # contexts chosen for "disk" do not carry over to another export
    hs.receive_data(option(Opt.GO, name_request(b"/vm/b.raw", [])))
    ev = step(hs)
    assert isinstance(ev, Negotiated) and ev.allocation_context is None


def test_export_name_with_and_without_zero_padding() -> None:
    for no_zeroes, pad in ((True, 0), (False, 124)):
        hs = start(no_zeroes)
        hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
        assert isinstance(step(hs), Negotiated)
        assert hs.data_to_send() == wire.EXPORT_NAME_REPLY.pack(1 << 20, FLAGS) + bytes(pad)


def test_export_name_of_unknown_export_ends_the_session() -> None:
    hs = start()
    hs.receive_data(option(Opt.EXPORT_NAME, b"nope"))
    ev = step(hs)
    assert isinstance(ev, Refused) and "nope" in ev.reason
    assert hs.data_to_send() == b""  # the spec allows no reply: we just close


def test_abort_is_acknowledged() -> None:
    hs = start()
    hs.receive_data(option(Opt.ABORT))
    assert isinstance(step(hs), Aborted)
    assert replies(hs.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]


def test_clean_close_between_options() -> None:
    hs = start()
    hs.receive_data(b"")
    assert isinstance(step(hs), Closed)


@pytest.mark.parametrize(
    "data, words",
    [
        (struct.pack(">I", 1 << 5), "client flags"),
        (struct.pack(">I", 1) + struct.pack(">QII", 0x1234, 7, 0), "option magic"),
        (struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 7, 1 << 20), "limit"),
    ],
)
def test_violations_raise_remote_protocol_error(data: bytes, words: str) -> None:
    hs = ServerHandshake()
    hs.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=words):
        step(hs)


@pytest.mark.parametrize("cut", [1, 3, 4 + 5, 4 + 16 + 2])
def test_truncated_handshake_is_a_remote_error(cut: int) -> None:
    full = struct.pack(">I", 1) + option(Opt.GO, name_request(b"disk", []))
    hs = ServerHandshake()
    hs.receive_data(full[:cut])
    assert step(hs) is NEED_DATA
    hs.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-handshake"):
        step(hs)


def test_client_rejects_oldstyle_and_non_fixed_servers() -> None:
    hs = ClientHandshake("disk")
    hs.receive_data(struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 0))
    with pytest.raises(RemoteProtocolError, match="newstyle"):
        hs.next_event()
    hs = ClientHandshake("disk")
    hs.receive_data(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0))
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        hs.next_event()


def test_client_falls_back_to_export_name_when_go_is_unsupported() -> None:
    hs = ClientHandshake("disk", structured=False)
    hs.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3))
    assert hs.next_event() is NEED_DATA
    sent = hs.data_to_send()
    assert sent[4:] == option(Opt.GO, name_request(b"disk", [Info.BLOCK_SIZE]))
    hs.receive_data(wire.OPTION_REPLY.pack(OPTION_REPLY_MAGIC, Opt.GO, Rep.ERR_UNSUP, 0))
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == option(Opt.EXPORT_NAME, b"disk")
    hs.receive_data(wire.EXPORT_NAME_REPLY.pack(12345, 1))
    ev = hs.next_event()
    assert isinstance(ev, Ready) and ev.size == 12345
