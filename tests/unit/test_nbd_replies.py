"""The client's reply parser: read data lands in the read's own buffer however the
stream is cut, whether fed as chunks or received straight into ``want_into``."""

from __future__ import annotations

import random

import pytest

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
