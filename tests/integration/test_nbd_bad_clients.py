"""Bad clients against a live server: each gets the reply the spec requires or a
clean disconnect, is logged as one line, and never disturbs a good client."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from shoal.nbd import wire
from shoal.nbd.backend import FileBackend
from shoal.nbd.client import NBDClient
from shoal.nbd.constants import (
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    Opt,
    Rep,
)
from tests.integration.nbd_helpers import (
    BackgroundServer,
    raw_connect,
    recv_eof,
    recv_exact,
    serving,
    short_dir,
)

SIZE = 8 << 20


@pytest.fixture
def server() -> Iterator[BackgroundServer]:
    with short_dir() as d:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        backend = FileBackend(image)
        with serving({"disk": backend}, os.path.join(d, "s")) as srv:
            yield srv
        backend.close()


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes = b"disk") -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def read_option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = wire.OPTION_REPLY.unpack(recv_exact(s, 20))
    assert magic == OPTION_REPLY_MAGIC
    return opt, rep, recv_exact(s, length)


def greet(s: socket.socket) -> None:
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))


def transmission(sock: str, structured: bool) -> socket.socket:
    """A raw socket past NBD_OPT_GO."""
    s = raw_connect(sock)
    greet(s)
    if structured:
        s.sendall(option(Opt.STRUCTURED_REPLY))
        assert read_option_reply(s)[1] == Rep.ACK
    s.sendall(option(Opt.GO, go_data()))
    while read_option_reply(s)[1] != Rep.ACK:
        pass
    return s


def request(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 77) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def read_error(s: socket.socket, structured: bool) -> tuple[int, int]:
    """(cookie, error) of one error reply."""
    if not structured:
        magic, error, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(s, 16))
        assert magic == SIMPLE_REPLY_MAGIC
        return cookie, error
    magic, flags, ctype, cookie, length = wire.CHUNK_HEADER.unpack(recv_exact(s, 20))
    assert magic == STRUCTURED_REPLY_MAGIC and ctype == Chunk.ERROR and flags & 1
    payload = recv_exact(s, length)
    error, mlen = wire.ERROR_PAYLOAD.unpack_from(payload)
    assert mlen and len(payload) == 6 + mlen  # a message for humans
    return cookie, error


def good_client_works(srv: BackgroundServer) -> None:
    async def check() -> None:
        async with await NBDClient.connect(srv.sock, "disk") as client:
            await client.write(0, b"good" * 1024)
            assert await client.read(0, 4096) == b"good" * 1024

    asyncio.run(asyncio.wait_for(check(), 20))


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shoal.nbd.server" and r.levelno >= logging.WARNING
    ]


def assert_one_line(caplog: pytest.LogCaptureFixture, *words: str) -> None:
    lines = warnings(caplog)
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "payload, words",
    [
        (struct.pack(">I", 3) + struct.pack(">QII", 0xBADBADBAD, Opt.GO, 0), ["bad option magic"]),
        (struct.pack(">I", 1 << 7), ["unknown client flags"]),
        (struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.GO, 1 << 30), ["limit"]),
        (struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"nope"), ["unknown export"]),
        (struct.pack(">H", 3), ["mid-handshake"]),  # truncated client flags
        (struct.pack(">I", 3) + option(Opt.GO, go_data())[:10], ["mid-handshake"]),
    ],
    ids=[
        "wrong-magic",
        "bad-flags",
        "huge-option",
        "export-name-unknown",
        "truncated-flags",
        "truncated-option",
    ],
)
def test_handshake_violations_disconnect(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture, payload: bytes, words: list[str]
) -> None:
    caplog.set_level(logging.WARNING, "shoal.nbd.server")
    s = raw_connect(server.sock)
    recv_exact(s, 18)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)  # a truncated message then EOF
    assert recv_eof(s) == b""  # no reply, just a clean close
    s.close()
    good_client_works(server)
    assert_one_line(caplog, *words)


def test_unknown_option_is_refused_and_negotiation_continues(server: BackgroundServer) -> None:
    s = raw_connect(server.sock)
    greet(s)
    s.sendall(option(4242, b"junk"))
    opt, rep, message = read_option_reply(s)
    assert (opt, rep) == (4242, Rep.ERR_UNSUP) and message
    s.sendall(option(Opt.GO, go_data()[:-1]))  # option length does not match its content
    assert read_option_reply(s)[1] == Rep.ERR_INVALID
    s.sendall(option(Opt.GO, go_data(b"missing")))
    assert read_option_reply(s)[1] == Rep.ERR_UNKNOWN
    s.sendall(option(Opt.ABORT))
    assert read_option_reply(s) == (Opt.ABORT, Rep.ACK, b"")
    assert recv_eof(s) == b""
    s.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_bad_requests_get_errors_and_the_connection_goes_on(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture, structured: bool
) -> None:
    caplog.set_level(logging.WARNING, "shoal.nbd.server")
    s = transmission(server.sock, structured)
    cases = [
        (request(42, 0, 512, cookie=1), EINVAL),  # unknown command
        (request(Cmd.READ, 0, 512, flags=1 << 12, cookie=2), EINVAL),  # unknown flag
        (request(Cmd.READ, SIZE - 511, 512, cookie=3), EINVAL),  # past the end
        (request(Cmd.WRITE, SIZE, 4, cookie=4) + b"abcd", ENOSPC),  # write past the end
        (
            request(Cmd.READ, 0, (32 << 20) + 1, cookie=5),
            EOVERFLOW if structured else EINVAL,
        ),  # oversized
        (request(Cmd.FLUSH, 0, 512, cookie=6), EINVAL),  # length where none belongs
        (request(Cmd.BLOCK_STATUS, 0, 512, cookie=7), EINVAL),  # no context negotiated
        (request(Cmd.TRIM, (1 << 64) - 512, 1024, cookie=8), ENOSPC),  # offset overflow
    ]
    for data, error in cases:
        s.sendall(data)
        cookie, got = read_error(s, structured)
        assert got == error, (cookie, got)
    # still usable: a valid write and read on the same connection
    s.sendall(request(Cmd.WRITE, 4096, 4, cookie=9) + b"wxyz")
    s.sendall(request(Cmd.READ, 4096, 4, cookie=10))
    data = recv_exact(s, 16 + (16 + 4 if not structured else 28 + 4))
    assert data.endswith(b"wxyz")
    s.sendall(request(Cmd.DISC, 0, 0))
    assert recv_eof(s) == b""
    s.close()
    lines = warnings(caplog)
    assert len(lines) == len(cases) and all("\n" not in line for line in lines)


@pytest.mark.parametrize(
    "tail, words",
    [
        (request(Cmd.WRITE, 0, 4096) + b"x" * 100, ["mid-request"]),  # payload cut short
        (request(Cmd.READ, 0, 512)[:13], ["mid-request"]),  # header cut short
        (struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512), ["bad request magic"]),
        (request(Cmd.WRITE, 0, (32 << 20) + 1), ["maximum block size"]),  # oversized payload
    ],
    ids=["cut-payload", "cut-header", "bad-magic", "oversized-write"],
)
def test_transmission_violations_disconnect(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture, tail: bytes, words: list[str]
) -> None:
    caplog.set_level(logging.WARNING, "shoal.nbd.server")
    s = transmission(server.sock, structured=True)
    s.sendall(tail)
    s.shutdown(socket.SHUT_WR)
    assert recv_eof(s) == b""
    s.close()
    good_client_works(server)
    assert_one_line(caplog, *words)


def test_abrupt_reset_mid_request_leaves_others_alone(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "shoal.nbd.server")
    s = transmission(server.sock, structured=False)
    s.sendall(request(Cmd.WRITE, 0, 1 << 20) + b"y" * 5000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    good_client_works(server)
    assert wait_until(lambda: server.connections() == 0)
    assert_one_line(caplog, "mid-request")


def test_half_close_after_pipelined_requests_still_gets_every_reply(
    server: BackgroundServer,
) -> None:
    s = transmission(server.sock, structured=False)
    s.sendall(b"".join(request(Cmd.FLUSH, 0, 0, cookie=100 + i) for i in range(50)))
    s.sendall(request(Cmd.TRIM, 0, 4096, cookie=200))
    s.shutdown(socket.SHUT_WR)
    data = recv_eof(s)
    s.close()
    cookies = sorted(wire.SIMPLE_REPLY.unpack_from(data, i)[2] for i in range(0, len(data), 16))
    assert len(data) == 51 * 16 and cookies == list(range(100, 150)) + [200]


def test_disc_walks_the_connection_phases(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "shoal.nbd.server")
    s = transmission(server.sock, structured=True)
    s.sendall(request(Cmd.FLUSH, 0, 0, cookie=5) + request(Cmd.DISC, 0, 0))
    data = recv_eof(s)
    s.close()
    assert wire.SIMPLE_REPLY.unpack(data) == (
        SIMPLE_REPLY_MAGIC,
        0,
        5,
    )  # the flush was answered first
    assert wait_until(lambda: server.connections() == 0)
    phases = [r.getMessage().split(": ", 1)[1] for r in caplog.records if " -> " in r.getMessage()]
    assert phases == ["handshake -> transmission", "transmission -> draining", "draining -> closed"]
    assert warnings(caplog) == []
