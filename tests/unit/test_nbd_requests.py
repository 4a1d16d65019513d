"""Transmission-phase parsing and validation, and reply encoding, without sockets."""

from __future__ import annotations

import pytest

from shoal.nbd import replies, wire
from shoal.nbd.constants import (
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    TxFlag,
)
from shoal.nbd.errors import RemoteProtocolError
from shoal.nbd.requests import HEADER, Request, RequestChecker, parse_request

ALL = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.CAN_MULTI_CONN
)


def req(cmd: int, offset: int = 0, length: int = 512, flags: int = 0, cookie: int = 7) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def test_parse_read_and_write_in_place() -> None:
    buf = (
        req(Cmd.READ, 4096, 512)
        + req(Cmd.WRITE, 0, 3, cookie=9)
        + b"abc"
        + req(Cmd.FLUSH, 0, 0)[:5]
    )
    r1, nxt = parse_request(buf, 0, len(buf), 1 << 20)
    assert r1 == Request(0, Cmd.READ, 7, 4096, 512) and nxt == HEADER
    r2, nxt2 = parse_request(buf, nxt, len(buf), 1 << 20)
    assert r2 is not None and r2.cookie == 9 and buf[nxt2 - 3 : nxt2] == b"abc"
    assert parse_request(buf, nxt2, len(buf), 1 << 20) == (None, HEADER)


def test_partial_write_payload_reports_total_size_needed() -> None:
    buf = req(Cmd.WRITE, 0, 100) + b"x" * 10
    assert parse_request(buf, 0, len(buf), 1 << 20) == (None, HEADER + 100)


def test_bad_magic_and_oversized_write_are_protocol_errors() -> None:
    bad = wire.REQUEST.pack(0xDEADBEEF, 0, 0, 1, 0, 512)
    with pytest.raises(RemoteProtocolError, match="magic"):
        parse_request(bad, 0, len(bad), 1 << 20)
    big = req(Cmd.WRITE, 0, (1 << 20) + 1)
    with pytest.raises(RemoteProtocolError, match="maximum block size"):
        parse_request(big, 0, len(big), 1 << 20)


def checker(
    flags: TxFlag = ALL, structured: bool = True, context: int | None = 1
) -> RequestChecker:
    return RequestChecker(
        size=1 << 20,
        flags=flags,
        structured=structured,
        allocation_context=context,
        minimum=1,
        maximum=65536,
    )


@pytest.mark.parametrize(
    "request_, error",
    [
        (Request(0, Cmd.READ, 1, 0, 4096), 0),
        (Request(CmdFlag.FUA, Cmd.WRITE, 1, 0, 4096), 0),
        (Request(CmdFlag.NO_HOLE | CmdFlag.FUA, Cmd.WRITE_ZEROES, 1, 0, 1 << 20), 0),
        (Request(CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 1, 0, 1 << 20), 0),
        (Request(0, Cmd.FLUSH, 1, 0, 0), 0),
        (Request(0, 42, 1, 0, 512), EINVAL),  # unknown command
        (Request(0, Cmd.CACHE, 1, 0, 512), EINVAL),  # not advertised
        (Request(1 << 9, Cmd.READ, 1, 0, 512), EINVAL),  # unknown flag
        (Request(CmdFlag.NO_HOLE, Cmd.WRITE, 1, 0, 512), EINVAL),  # flag of another command
        (Request(0, Cmd.FLUSH, 1, 0, 512), EINVAL),  # FLUSH with a length
        (Request(0, Cmd.READ, 1, (1 << 20) - 511, 512), EINVAL),  # past the end
        (Request(0, Cmd.WRITE, 1, 1 << 20, 1), ENOSPC),  # write past the end
        (Request(0, Cmd.TRIM, 1, (1 << 64) - 1, 1), ENOSPC),  # overflowing offset
        (Request(0, Cmd.READ, 1, 0, 65537), EOVERFLOW),  # larger than the maximum block
        (Request(0, Cmd.READ, 1, 0, 0), EINVAL),
    ],
)
def test_checker(request_: Request, error: int) -> None:
    got, message = checker().check(request_)
    assert got == error
    assert bool(message) == bool(error)


def test_checker_read_only_and_negotiation_dependent() -> None:
    ro = checker(ALL | TxFlag.READ_ONLY)
    assert ro.check(Request(0, Cmd.WRITE, 1, 0, 512))[0] == EPERM
    assert ro.check(Request(0, Cmd.TRIM, 1, 0, 512))[0] == EPERM
    assert checker(context=None).check(Request(0, Cmd.BLOCK_STATUS, 1, 0, 512))[0] == EINVAL
    assert checker(structured=False).check(Request(CmdFlag.DF, Cmd.READ, 1, 0, 512))[0] == EINVAL
    assert checker(structured=False).check(Request(0, Cmd.READ, 1, 0, 1 << 17))[0] == EINVAL
    no_trim = checker(TxFlag.HAS_FLAGS)
    assert no_trim.check(Request(0, Cmd.TRIM, 1, 0, 512))[0] == EINVAL


def test_replies_round_trip_through_the_client_parser() -> None:
    parser = replies.ReplyParser()
    parser.expect_read(1, 100, 4)
    out = bytearray(32)
    n = replies.pack_read_header(out, 1, 100, 4, structured=False)
    stream = bytes(out[:n]) + b"data"
    n = replies.pack_read_header(out, 2, 200, 3, structured=True)
    stream += bytes(out[:n]) + b"xyz"
    stream += replies.simple_reply(3) + replies.error_chunk(4, EINVAL, "bad")
    stream += replies.block_status_chunk(5, 1, [(4096, 3), (512, 0)])
    events = []
    for i in range(len(stream)):  # one byte at a time: framing must hold
        events += parser.receive_data(stream[i : i + 1])
    assert [(e.cookie, e.done) for e in events] == [
        (1, True),
        (2, True),
        (3, True),
        (4, True),
        (5, True),
    ]
    assert events[0].data == b"data" and events[0].offset == 100
    assert events[1].data == b"xyz" and events[1].offset == 200
    assert events[3].error == EINVAL and events[3].message == "bad"
    assert events[4].extents == [(4096, 3), (512, 0)] and events[4].context_id == 1


def test_client_parser_rejects_malformed_chunks() -> None:
    bad = wire.CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, 1, Chunk.OFFSET_HOLE, 1, 3) + b"abc"
    with pytest.raises(RemoteProtocolError):
        replies.ReplyParser().receive_data(bad)
    with pytest.raises(RemoteProtocolError, match="magic"):
        replies.ReplyParser().receive_data(b"\x00" * 16)
