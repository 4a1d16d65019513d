"""Fuzzing the sans-I/O protocol code with hypothesis.

Whatever bytes arrive, in whatever pieces, the parsers either make progress
or raise :class:`RemoteProtocolError`; they never raise anything else, never
loop, and what the server sends back stays well-framed. Bounded here (a few
seconds); ``bench/fuzz_nbd.py`` runs the same properties for longer by setting
``NBD_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.nbd import replies, wire
from shoal.nbd.backend import BlockSizes
from shoal.nbd.constants import (
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    Opt,
    Rep,
    TxFlag,
)
from shoal.nbd.errors import RemoteProtocolError
from shoal.nbd.fencing import parse_preempt, parse_register
from shoal.nbd.requests import RequestChecker, parse_request
from shoal.nbd.server_handshake import (
    NEED_DATA,
    ExportInfo,
    ListExports,
    LookupExport,
    Preempt,
    Register,
    ServerHandshake,
)

EXAMPLES = int(os.environ.get("NBD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 150,  # the suite is reproducible; long runs explore
)


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        if name in ("disk", ""):
            return ExportInfo(name, 1 << 20, TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, BlockSizes())
        return None

    def names(self) -> list[str]:
        return ["disk", ""]


def check_option_replies(data: bytes) -> None:
    """Everything the server sends after the greeting is a sequence of framed replies
    (or the 10/134-byte reply to EXPORT_NAME, which ends the stream)."""
    pos = 0
    while pos < len(data):
        if len(data) - pos in (10, 134):
            return
        magic, _, _, length = wire.OPTION_REPLY.unpack_from(data, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += 20 + length
    assert pos == len(data)


def drive_handshake(chunks: list[bytes]) -> None:
    hs = ServerHandshake()
    catalog = Catalog()
    hs.data_to_send()
    sent = b""
    try:
        for chunk in chunks + [b""]:
            hs.receive_data(chunk)
            event = hs.next_event()
            while isinstance(event, LookupExport | ListExports | Register | Preempt):
                if isinstance(event, LookupExport):
                    hs.answer_export(catalog.lookup(event.name))
                elif isinstance(event, ListExports):
                    hs.answer_names(catalog.names())
                elif isinstance(event, Register) and event.registration.key < 5:
                    hs.refuse(Rep.ERR_POLICY, "fenced")
                else:
                    hs.accept()
                event = hs.next_event()
            sent += hs.data_to_send()
            if event is not NEED_DATA:
                break
    except RemoteProtocolError:
        pass
    check_option_replies(sent)


def opt(code: int, data: bytes) -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def string(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


fencing_options = st.sampled_from([Opt.SHOAL_REGISTER, Opt.SHOAL_PREEMPT])
names = st.sampled_from([b"disk", b"", b"nope", b"\xff", b"d\x00k"]) | st.binary(max_size=20)
options = st.one_of(
    st.builds(opt, st.integers(0, 16), st.binary(max_size=64)),
    st.builds(
        lambda n, infos: opt(
            Opt.GO,
            string(n)
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos),
        ),
        names,
        st.lists(st.integers(0, 5), max_size=4),
    ),
    st.builds(
        lambda code, n, qs: opt(
            code, string(n) + struct.pack(">I", len(qs)) + b"".join(string(q) for q in qs)
        ),
        st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]),
        names,
        st.lists(
            st.sampled_from([b"base:allocation", b"base:", b"x:y"]) | st.binary(max_size=8),
            max_size=3,
        ),
    ),
    st.builds(lambda: opt(Opt.STRUCTURED_REPLY, b"")),
    st.builds(lambda: opt(Opt.LIST, b"")),
    st.builds(lambda n: opt(Opt.EXPORT_NAME, n), names),
    st.builds(
        lambda code, holder, key: opt(
            code, json.dumps({"holder": holder, "key": key, "below": key}).encode()
        ),
        fencing_options,
        st.sampled_from(["node2", "", "x" * 65, "a\nb"]) | st.text(max_size=8),
        st.integers(0, 9) | st.integers(-2, 1 << 65) | st.booleans(),
    ),
    st.builds(opt, fencing_options, st.binary(max_size=64)),
    st.binary(max_size=40),  # garbage
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6))
def test_handshake_random_bytes(data: bytes, cuts: list[int]) -> None:
    drive_handshake(split(data, cuts))


@FUZZ
@given(
    st.sampled_from([0, 1, 2, 3, 4]),
    st.lists(options, max_size=8),
    st.lists(st.integers(0, 1000), max_size=6),
)
def test_handshake_option_sequences(flags: int, opts: list[bytes], cuts: list[int]) -> None:
    drive_handshake(split(struct.pack(">I", flags) + b"".join(opts), cuts))


@FUZZ
@given(
    st.binary(max_size=80)
    | st.builds(
        lambda obj: json.dumps(obj).encode(),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=6),
            lambda inner: st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["holder", "key", "below", "x"]), inner),
            max_leaves=6,
        ),
    )
)
def test_fencing_payloads_parse_or_raise_value_error(data: bytes) -> None:
    for parse in (parse_register, parse_preempt):
        try:
            parsed = parse(data)
        except ValueError:
            continue
        assert 1 <= len(parsed.holder) <= 64 and parsed.holder.isprintable()


requests = st.one_of(
    st.builds(
        lambda flags, cmd, offset, length, payload: (
            wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, 1, offset, length) + payload
        ),
        st.integers(0, 0xFFFF),
        st.integers(0, 10) | st.integers(0, 0xFFFF),
        st.integers(0, 2 << 20) | st.integers(0, (1 << 64) - 1),
        st.integers(0, 4096) | st.integers(0, (1 << 32) - 1),
        st.binary(max_size=64),
    ),
    st.binary(max_size=40),
)


@FUZZ
@given(st.lists(requests, max_size=10), st.booleans())
def test_request_stream(stream: list[bytes], structured: bool) -> None:
    buf = b"".join(stream)
    checker = RequestChecker(
        size=1 << 20,
        flags=TxFlag.HAS_FLAGS | TxFlag.SEND_TRIM,
        structured=structured,
        allocation_context=1 if structured else None,
        minimum=1,
        maximum=1 << 16,
    )
    pos = 0
    try:
        while pos < len(buf):
            req, nxt = parse_request(buf, pos, len(buf), 1 << 16)
            if req is None:
                assert nxt > len(buf) - pos  # it really needs more bytes
                break
            assert nxt > pos
            error, message = checker.check(req)
            assert error in (0, 1, 22, 28, 75) and bool(message) == bool(error)
            if req.cmd == Cmd.WRITE:
                assert req.length <= 1 << 16
            pos = nxt
    except RemoteProtocolError:
        pass


reply_pieces = st.one_of(
    st.builds(
        lambda cookie, error, data: wire.SIMPLE_REPLY.pack(0x67446698, error, cookie) + data,
        st.integers(0, 3),
        st.sampled_from([0, 0, 5, 22]),
        st.binary(max_size=20),
    ),
    st.builds(
        lambda flags, ctype, cookie, payload, fake_len: (
            wire.CHUNK_HEADER.pack(
                0x668E33EF, flags, ctype, cookie, len(payload) if fake_len is None else fake_len
            )
            + payload
        ),
        st.integers(0, 3),
        st.sampled_from([0, 1, 2, 5, 0x8001, 0x8002, 7, 0x8123]),
        st.integers(0, 3),
        st.binary(max_size=40),
        st.none() | st.integers(0, 64),
    ),
    st.binary(max_size=30),
)


@FUZZ
@given(
    st.lists(reply_pieces, max_size=8).map(b"".join),
    st.lists(st.integers(0, 1000), max_size=6),
    st.booleans(),
)
def test_client_reply_parser(data: bytes, cuts: list[int], into_buffer: bool) -> None:
    parser = replies.ReplyParser()
    parser.expect_read(1, 0, 16, bytearray(16) if into_buffer else None)
    try:
        for chunk in split(data, cuts):
            for event in parser.receive_data(chunk):
                assert event.cookie >= 0
    except RemoteProtocolError:
        pass
