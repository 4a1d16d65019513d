"""The client's reply parser: read data lands in the read's own buffer however the
stream is cut, whether fed as chunks or received straight into ``want_into``."""

from __future__ import annotations

import random

import pytest

from shoal.nbd import wire
from shoal.nbd.constants import REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC, Chunk
from shoal.nbd.errors import RemoteProtocolError
from shoal.nbd.replies import ReplyEvent, ReplyParser, error_reply, pack_read_header


def read_reply(cookie: int, offset: int, data: bytes, structured: bool) -> bytes:
    head = bytearray(64)
    n = pack_read_header(head, cookie, offset, len(data), structured)
    return bytes(head[:n]) + data


def feed(parser: ReplyParser, stream: bytes, rng: random.Random, into: bool) -> list[ReplyEvent]:
    """Feed ``stream`` in random cuts; with ``into``, bytes the parser wants in a
    read's buffer are put there as a BufferedProtocol's transport would."""
    events: list[ReplyEvent] = []
    pos = 0
    while pos < len(stream):
        cut = rng.choice([1, 3, 16, 100, 4096, 70000, len(stream)])
        view = parser.want_into() if into else None
        if view is not None:
            n = min(cut, len(view), len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            events += parser.received_into(n)
        else:
            n = min(cut, len(stream) - pos)
            events += parser.receive_data(stream[pos : pos + n])
        pos += n
    return events


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_read_data_lands_in_its_buffer_however_the_stream_is_cut(structured: bool, into: bool) -> None:
    rng = random.Random(7)
    for _ in range(30):
        parser = ReplyParser()
        reads = []
        stream = b""
        for cookie in range(1, 6):
            length = rng.choice([1, 512, 4096, 65536, 1 << 20])
            data = rng.randbytes(length)
            dest = bytearray(length)
            parser.expect_read(cookie, cookie * (1 << 30), length, dest)
            reads.append((cookie, data, dest))
            stream += read_reply(cookie, cookie * (1 << 30), data, structured)
        stream += error_reply(9, 5, "no such block", structured)
        events = feed(parser, stream, rng, into)
        assert [e.cookie for e in events] == [1, 2, 3, 4, 5, 9]
        assert all(e.done and not e.data for e in events[:5])
        assert events[5].error == 5
        for cookie, data, dest in reads:
            assert dest == data, f"read {cookie} holds other bytes than were sent"
        assert parser.want_into() is None


def test_a_chunk_outside_its_read_is_refused_before_any_byte_lands() -> None:
    parser = ReplyParser()
    dest = bytearray(4096)
    parser.expect_read(1, 8192, 4096, dest)
    stream = read_reply(1, 8192 + 512, b"x" * 4096, structured=True)  # 512 bytes past the end
    with pytest.raises(RemoteProtocolError, match="outside the request"):
        parser.receive_data(stream[:40])
    assert dest == bytearray(4096)


def chunk(cookie: int, ctype: int, payload: bytes, done: bool) -> bytes:
    return wire.CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, ctype, cookie,
                                  len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_DATA, wire.U64.pack(offset) + data, done)


def hole_chunk(cookie: int, offset: int, n: int, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_HOLE, wire.U64.pack(offset) + wire.U32.pack(n), done)


@pytest.mark.parametrize("into", [False, True])
def test_a_stale_buffer_ends_as_the_reply_or_zeros_never_as_old_bytes(into: bool) -> None:
    """A read's buffer need not be zeroed first (util.buffers.unzeroed): whatever the
    reply leaves unfilled (holes, gaps between chunks, no data at all) reads as zeros."""
    rng = random.Random(3)
    n, base = 256 * 1024, 1 << 30
    a, b = rng.randbytes(64 * 1024), rng.randbytes(32 * 1024)
    cases = {
        # cookie: (stream, the content the read must end with)
        1: (data_chunk(1, base, a + a + a + a, done=True), a * 4),
        2: (hole_chunk(2, base, n // 2) + data_chunk(2, base + n // 2, a + a, done=True), bytes(n // 2) + a + a),
        3: (data_chunk(3, base + 1000, b) + data_chunk(3, base + n - len(b), b) + chunk(3, Chunk.NONE, b"", True),
            bytes(1000) + b + bytes(n - 1000 - 2 * len(b)) + b),
        4: (chunk(4, Chunk.NONE, b"", True), bytes(n)),
        5: (read_reply(5, base, a * 4, structured=False), a * 4),
    }
    for cookie, (stream, want) in cases.items():
        parser = ReplyParser()
        dest = bytearray(b"\xee" * n)  # what an unzeroed buffer may hold
        parser.expect_read(cookie, base, n, dest, stale=True)
        events = feed(parser, stream, rng, into)
        assert events and events[-1].done and not any(e.error for e in events)
        assert dest == want, f"case {cookie}: the buffer kept old bytes or lost reply bytes"


def test_a_hole_outside_its_read_is_refused() -> None:
    parser = ReplyParser()
    dest = bytearray(4096)
    parser.expect_read(1, 8192, 4096, dest, stale=True)
    with pytest.raises(RemoteProtocolError, match="outside the request"):
        parser.receive_data(hole_chunk(1, 8192 + 2048, 4096, done=True))
