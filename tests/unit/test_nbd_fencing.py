"""Fencing without sockets: payloads, the floor table, and REGISTER/PREEMPT in the
sans-I/O handshakes (server questions, client errors), paired in memory."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest

from shoal.nbd import wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.client_handshake import ClientHandshake, Preempted, Ready
from shoal.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Opt, Rep, TxFlag
from shoal.nbd.errors import (
    FencingUnsupported,
    HandshakeRefused,
    LocalProtocolError,
    NBDConnectionError,
    NBDFenced,
)
from shoal.nbd.fencing import (
    FloorTable,
    PreemptOrder,
    Registration,
    encode_preempt,
    encode_register,
    parse_preempt,
    parse_register,
)
from shoal.nbd.server_handshake import (
    NEED_DATA,
    ExportInfo,
    LookupExport,
    Negotiated,
    Preempt,
    Refused,
    Register,
    ServerHandshake,
)

DISK = ExportInfo("disk", 1 << 20, TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, BlockSizes())


# --- payloads and floors ----------------------------------------------------------


def test_payloads_round_trip_as_compact_json() -> None:
    reg = Registration("node2", 7)
    assert encode_register(reg) == b'{"holder":"node2","key":7}'
    assert parse_register(encode_register(reg)) == reg
    order = PreemptOrder("node2", (1 << 64) - 1)
    assert parse_preempt(encode_preempt(order)) == order
    # unknown fields are ignored (room to grow)
    assert parse_register(b'{"holder":"n","key":0,"v":2}') == Registration("n", 0)


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "not UTF-8 JSON"),
        (b"\xff", "not UTF-8 JSON"),
        (b"[" * 1000, "not UTF-8 JSON"),  # nesting must not blow the stack
        (b" " * 2000, "limit is 1024"),
        (b"[1]", "JSON object"),
        (b'{"holder":"n"}', '"key"'),
        (b'{"holder":"","key":1}', "1 to 64 characters"),
        (json.dumps({"holder": "x" * 65, "key": 1}).encode(), "1 to 64 characters"),
        (b'{"holder":"a\\nb","key":1}', "printable"),
        (b'{"holder":5,"key":1}', "holder must be a string"),
        (b'{"holder":"n","key":-1}', "0 to 2**64-1"),
        (b'{"holder":"n","key":18446744073709551616}', "0 to 2**64-1"),
        (b'{"holder":"n","key":1.0}', "integer"),
        (b'{"holder":"n","key":true}', "integer"),
    ],
)
def test_bad_register_payloads_say_what_is_wrong(payload: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("*", r"\*")):
        parse_register(payload)


def test_floors_only_rise_and_refusals_are_sentences() -> None:
    floors = FloorTable()
    assert floors.refusal(Registration("node2", 0)) is None
    assert floors.raise_floor(PreemptOrder("node2", 5)) == 5
    assert floors.raise_floor(PreemptOrder("node2", 3)) == 5  # never lower
    assert floors.refusal(Registration("node2", 4)) == (
        "holder node2 is fenced below key 5; register with a newer key"
    )
    assert floors.refusal(Registration("node2", 5)) is None
    assert floors.refusal(Registration("node3", 0)) is None  # per holder
    assert floors.snapshot() == {"node2": 5}


# --- server handshake --------------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def go(name: bytes) -> bytes:
    return option(Opt.GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(data)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def started() -> ServerHandshake:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3))
    assert hs.next_event() is NEED_DATA
    return hs


def test_register_is_a_question_and_accept_acks_it() -> None:
    hs = started()
    hs.receive_data(option(Opt.SHOAL_REGISTER, b'{"holder":"node2","key":7}'))
    assert hs.next_event() == Register(Registration("node2", 7))
    with pytest.raises(LocalProtocolError, match="answer"):
        hs.next_event()  # a question is out
    with pytest.raises(LocalProtocolError, match="no question of that kind"):
        hs.answer_export(DISK)
    hs.accept()
    assert hs.registration == Registration("node2", 7)
    assert replies(hs.data_to_send()) == [(Opt.SHOAL_REGISTER, Rep.ACK, b"")]
    # a second REGISTER on a registered connection is refused without a question
    hs.receive_data(option(Opt.SHOAL_REGISTER, b'{"holder":"node2","key":8}'))
    assert hs.next_event() is NEED_DATA
    ((_, rep, message),) = replies(hs.data_to_send())
    assert rep == Rep.ERR_INVALID and b"already registered as holder node2 key 7" in message


def test_refused_register_leaves_the_connection_unregistered_and_usable() -> None:
    hs = started()
    hs.receive_data(option(Opt.SHOAL_REGISTER, b'{"holder":"node2","key":1}'))
    assert isinstance(hs.next_event(), Register)
    hs.refuse(Rep.ERR_POLICY, "holder node2 is fenced below key 2; register with a newer key")
    hs.receive_data(option(Opt.SHOAL_REGISTER, b'{"holder":"node2","key":2}'))
    assert hs.next_event() == Register(Registration("node2", 2))  # may try again
    hs.accept()
    got = replies(hs.data_to_send())
    assert got == [
        (Opt.SHOAL_REGISTER, Rep.ERR_POLICY, b"holder node2 is fenced below key 2; register with a newer key"),
        (Opt.SHOAL_REGISTER, Rep.ACK, b""),
    ]


def test_malformed_fencing_options_get_err_invalid() -> None:
    hs = started()
    hs.receive_data(option(Opt.SHOAL_REGISTER, b"holder=node2"))
    hs.receive_data(option(Opt.SHOAL_PREEMPT, b'{"holder":"node2","key":1}'))
    assert hs.next_event() is NEED_DATA
    got = replies(hs.data_to_send())
    assert [(o, r) for o, r, _ in got] == [
        (Opt.SHOAL_REGISTER, Rep.ERR_INVALID),
        (Opt.SHOAL_PREEMPT, Rep.ERR_INVALID),
    ]
    assert b"not UTF-8 JSON" in got[0][2] and b'"below"' in got[1][2]


def test_preempt_is_acked_only_when_the_caller_accepts() -> None:
    hs = started()
    hs.receive_data(option(Opt.SHOAL_PREEMPT, b'{"holder":"node2","below":9}') + go(b"disk"))
    assert hs.next_event() == Preempt(PreemptOrder("node2", 9))
    assert hs.data_to_send() == b""  # nothing until the fencing is done
    hs.accept()
    assert replies(hs.data_to_send()) == [(Opt.SHOAL_PREEMPT, Rep.ACK, b"")]
    assert hs.next_event() == LookupExport("disk", Opt.GO)  # the buffered GO comes next


def test_refused_lookups() -> None:
    hs = started()
    hs.receive_data(go(b"disk"))
    assert hs.next_event() == LookupExport("disk", Opt.GO)
    hs.refuse(Rep.ERR_POLICY, "fenced")
    assert replies(hs.data_to_send()) == [(Opt.GO, Rep.ERR_POLICY, b"fenced")]
    hs.receive_data(option(Opt.LIST))
    assert hs.next_event() is not NEED_DATA
    hs.refuse(Rep.ERR_UNKNOWN, "listing exports failed: boom")
    assert replies(hs.data_to_send()) == [(Opt.LIST, Rep.ERR_UNKNOWN, b"listing exports failed: boom")]
    hs.receive_data(go(b"disk"))
    assert hs.next_event() == LookupExport("disk", Opt.GO)
    hs.answer_export(DISK)
    assert isinstance(hs.next_event(), Negotiated)

    hs = started()
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert hs.next_event() == LookupExport("disk", Opt.EXPORT_NAME)
    hs.refuse(Rep.ERR_UNKNOWN, "resolver down")
    ev = hs.next_event()  # EXPORT_NAME has no error reply: the session ends
    assert isinstance(ev, Refused) and "resolver down" in ev.reason
    assert hs.data_to_send() == b""


def test_export_names_reach_the_caller_exactly_as_sent() -> None:
    hs = started()
    hs.receive_data(go("//vm/../Disk é".encode()))
    assert hs.next_event() == LookupExport("//vm/../Disk é", Opt.GO)


def test_long_messages_are_clipped_without_breaking_utf8() -> None:
    hs = started()
    hs.receive_data(go(b"disk"))
    hs.next_event()
    hs.refuse(Rep.ERR_UNKNOWN, "é" * 3000)  # 6000 bytes
    ((_, _, message),) = replies(hs.data_to_send())
    assert len(message) == 4096 and message.decode() == "é" * 2048


# --- client handshake ----------------------------------------------------------------


def client_started(hs: ClientHandshake) -> bytes:
    hs.receive_data(wire.GREETING.pack(NBDMAGIC, IHAVEOPT, 3))
    assert hs.next_event() is NEED_DATA
    return hs.data_to_send()[4:]


def server_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return wire.OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def test_client_registers_first_and_raises_nbd_fenced_with_the_servers_sentence() -> None:
    hs = ClientHandshake("disk", register=Registration("node2", 1), target="10.0.0.5:10809")
    assert client_started(hs) == option(Opt.SHOAL_REGISTER, b'{"holder":"node2","key":1}')
    sentence = b"holder node2 is fenced below key 2; register with a newer key"
    hs.receive_data(server_reply(Opt.SHOAL_REGISTER, Rep.ERR_POLICY, sentence))
    with pytest.raises(NBDFenced) as err:
        hs.next_event()
    assert str(err.value) == sentence.decode()
    assert (err.value.holder, err.value.key) == ("node2", 1)
    assert not isinstance(err.value, NBDConnectionError)  # reconnect() must not retry it


def test_client_reports_a_target_without_fencing() -> None:
    hs = ClientHandshake("disk", register=Registration("node2", 1), target="10.0.0.5:10809")
    client_started(hs)
    hs.receive_data(server_reply(Opt.SHOAL_REGISTER, Rep.ERR_UNSUP, b"Unsupported option"))
    with pytest.raises(FencingUnsupported) as err:
        hs.next_event()
    assert str(err.value).startswith(
        "the storage target at 10.0.0.5:10809 does not support shoal fencing "
        "(NBD_OPT_SHOAL_REGISTER 0x53480001 unsupported); use `shoal nbd serve`"
    )
    hs = ClientHandshake("disk", register=Registration("node2", 1))
    client_started(hs)
    hs.receive_data(server_reply(Opt.SHOAL_REGISTER, Rep.ERR_INVALID, b"bad"))
    with pytest.raises(HandshakeRefused, match="bad"):
        hs.next_event()


def test_client_preempt_sends_abort_after_the_ack() -> None:
    hs = ClientHandshake("", preempt=PreemptOrder("node2", 2))
    assert client_started(hs) == option(Opt.SHOAL_PREEMPT, b'{"holder":"node2","below":2}')
    hs.receive_data(server_reply(Opt.SHOAL_PREEMPT, Rep.ACK))
    assert hs.next_event() == Preempted(PreemptOrder("node2", 2))
    assert hs.data_to_send() == option(Opt.ABORT)


def answer(server: ServerHandshake, floors: FloorTable) -> object:
    """next_event(), answering questions the way the asyncio server does."""
    while True:
        event = server.next_event()
        if isinstance(event, Register):
            refusal = floors.refusal(event.registration)
            if refusal:
                server.refuse(Rep.ERR_POLICY, refusal)
            else:
                server.accept()
        elif isinstance(event, LookupExport):
            server.answer_export(DISK if event.name == "disk" else None)
        else:
            return event


@pytest.mark.parametrize("key, fenced", [(3, False), (2, True)])
def test_registered_client_and_server_paired_in_memory(key: int, fenced: bool) -> None:
    client = ClientHandshake("disk", register=Registration("node2", key))
    server = ServerHandshake()
    floors = FloorTable()
    floors.raise_floor(PreemptOrder("node2", 3))
    c_event: object = NEED_DATA
    s_event: object = NEED_DATA
    with pytest.raises(NBDFenced) if fenced else contextlib.nullcontext():
        for _ in range(20):
            data = server.data_to_send()
            if data:
                client.receive_data(data)
            if c_event is NEED_DATA:
                c_event = client.next_event()
            data = client.data_to_send()
            if s_event is NEED_DATA:
                server.receive_data(data)
                s_event = answer(server, floors)
            if c_event is not NEED_DATA and s_event is not NEED_DATA:
                break
    if not fenced:
        assert isinstance(c_event, Ready) and c_event.structured
        assert isinstance(s_event, Negotiated)
        assert server.registration == Registration("node2", 3)
    else:
        assert server.registration is None
