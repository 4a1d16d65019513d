"""The agent channel's frames: the receiver without sockets (any chunking, in-place
payloads, limits), then the real channel on loopback, on the standard loop and on
uvloop: payload sizes around the edges, back-to-back calls, a frame dribbled byte by
byte, peers that vanish mid-payload or stop reading, strangers and cut-off calls;
answers sent from a pipe, and request payloads received into one; calls started
from a callback."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from shoal.netft import channel
from shoal.netft.channel import (
    HANDSHAKE_FRAME_MAX,
    ChannelServer,
    Connection,
    FrameReceiver,
    FrameStream,
    Handler,
)
from shoal.netft.errors import AuthenticationFailed, RemoteError, RemoteProtocolError
from shoal.netft.protocol import (
    FRAME_HEADER_SIZE,
    MAX_HEADER,
    MAX_PAYLOAD,
    derive_key,
    encode_frame,
    parse_nonce,
    proof,
)
from shoal.util.pipes import F_SETPIPE_SZ, POOL, Piped, unread
from tests.loops import LOOPS, LoopFactory, run
from tests.pipe_helpers import (
    Taken,
    assert_no_pipe_leaked,
    closed,
    in_pipe,
    pool_is_clean,
    record_pipes,
    take_out,
)

KEY = derive_key(b"k" * 32, "demo", "channel")
MIB = 1 << 20

# -- the receiver, without sockets -------------------------------------------------


def feed(rx: FrameReceiver, data: bytes, chunks: list[int] | None = None) -> None:
    """Deliver ``data`` as a kernel would: at most what ``get_buffer`` offers per receive,
    and at most the next chunk size (cycled) when ``chunks`` is given."""
    pos, i = 0, 0
    while pos < len(data):
        buf = rx.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos)
        if chunks:
            n = min(n, chunks[i % len(chunks)])
            i += 1
        buf[:n] = data[pos : pos + n]
        rx.buffer_updated(n)
        pos += n


def drain_frames(rx: FrameReceiver) -> list[tuple[dict[str, Any], bytes]]:
    out = []
    while rx.has_frames():
        header, payload = rx.pop()
        assert not isinstance(payload, Piped), "this receiver wants no pipes"
        out.append((header, payload))
    return out


frames_st = hs.lists(
    hs.tuples(
        hs.dictionaries(hs.sampled_from(["id", "op", "args", "x" * 300]), hs.integers(0, 1 << 40), max_size=4),
        hs.sampled_from([0, 1, 7, 100, 255, 256, 257, 1000, 5000]).map(lambda n: bytes(range(256)) * (n // 256)
                                                                       + bytes(n % 256)),
    ),
    min_size=1, max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(frames_st, hs.lists(hs.integers(1, 600), min_size=1, max_size=5), hs.sampled_from([64, 256, 4096]))
def test_any_chunking_yields_the_frames_sent(frames: list[tuple[dict[str, Any], bytes]], chunks: list[int],
                                             scratch: int) -> None:
    # a small scratch buffer exercises headers larger than it, compaction, payloads
    # straddling it, as the 64 KiB one does with real sizes
    rx = FrameReceiver(scratch)
    feed(rx, b"".join(encode_frame(h, p) for h, p in frames), chunks)
    got = drain_frames(rx)
    assert [(h, bytes(p)) for h, p in got] == frames
    assert rx.queued_bytes == 0


def test_a_large_payload_is_received_in_the_bytearray_handed_over() -> None:
    rx = FrameReceiver()
    payload = bytes(range(256)) * (MIB // 256)
    wire = encode_frame({"id": 1}, payload)
    first = 1000  # the head and some payload arrive together in the scratch buffer
    feed(rx, wire[:first])
    buf = rx.get_buffer()
    target = buf.obj
    assert isinstance(target, bytearray) and len(target) == MIB and len(buf) == len(wire) - first
    del buf
    feed(rx, wire[first:])
    (header, got), = drain_frames(rx)
    assert header == {"id": 1} and got is target and got == payload
    assert isinstance(got, bytearray)
    got.extend(b"x")  # no view of it is left behind: it can even grow


def test_frames_that_arrive_whole_are_copied_out_of_the_scratch_buffer() -> None:
    rx = FrameReceiver()
    feed(rx, encode_frame({"id": 1}, b"abc") + encode_frame({"id": 2}) + encode_frame({"id": 3}, b"d"))
    frames = drain_frames(rx)
    assert frames == [({"id": 1}, b"abc"), ({"id": 2}, b""), ({"id": 3}, b"d")]
    assert rx.get_buffer().obj is rx.get_buffer().obj  # the same scratch buffer, reused


def test_a_header_larger_than_the_scratch_buffer() -> None:
    rx = FrameReceiver()
    header = {"args": {"blob": "x" * (200 << 10)}}
    feed(rx, encode_frame(header, b"tail") + encode_frame({"id": 2}), [3000])
    assert drain_frames(rx) == [(header, b"tail"), ({"id": 2}, b"")]


@pytest.mark.parametrize("prefix", [
    struct.pack(">II", MAX_HEADER + 1, 0),
    struct.pack(">II", 10, MAX_PAYLOAD + 1),
])
def test_sizes_over_the_limits_are_refused(prefix: bytes) -> None:
    rx = FrameReceiver()
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        feed(rx, prefix)


def test_before_the_handshake_a_large_frame_is_refused_before_anything_is_allocated() -> None:
    rx = FrameReceiver()
    rx.max_frame = HANDSHAKE_FRAME_MAX
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        feed(rx, struct.pack(">II", 10, 64 << 20))  # a stranger declaring a 64 MiB payload
    assert rx._part is None


def test_a_header_that_is_not_a_json_object_is_refused() -> None:
    for raw in (b"{not json", b"[1, 2]"):
        rx = FrameReceiver()
        with pytest.raises(RemoteProtocolError):
            feed(rx, struct.pack(">II", len(raw), 0) + raw)


def test_queued_bytes_count_what_is_not_taken() -> None:
    rx = FrameReceiver()
    one = encode_frame({"id": 1}, b"x" * 100)
    feed(rx, one + one)
    assert rx.queued_bytes == 2 * len(one)
    rx.pop()
    assert rx.queued_bytes == len(one)


# -- the channel on loopback, on both loops ----------------------------------------------

@contextlib.asynccontextmanager
async def serving(handler: Handler, **kw: Any) -> AsyncIterator[tuple[ChannelServer, int]]:
    """A server with ``handler`` on a loopback port: (server, port); closed when the
    block ends."""
    srv = ChannelServer("demo", "a", KEY, handler, **kw)
    await srv.listen("cluster", "127.0.0.1", 0)
    try:
        yield srv, srv.servers["cluster"].sockets[0].getsockname()[1]
    finally:
        srv.close()


@contextlib.asynccontextmanager
async def echo_server(seen: list[Any] | None = None) -> AsyncIterator[tuple[ChannelServer, int]]:
    """A server whose handler answers with the payload reversed (and records its type);
    closed when the block ends."""

    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes]:
        assert not isinstance(payload, Piped), "this server wants no pipes"
        if seen is not None:
            seen.append(type(payload))
        if op == "sleep":
            await asyncio.sleep(float(args["s"]))
        if op == "fail":
            raise RemoteError("refused")
        return {"op": op, "n": len(payload)}, payload[::-1]

    async with serving(handler) as served:
        yield served


async def connect(port: int, key: bytes = KEY) -> Connection:
    return await Connection.open("demo", "b", key, "a", "cluster", "127.0.0.1", port)


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_round_trips_of_every_size(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        seen: list[Any] = []
        async with echo_server(seen) as (srv, port):
            conn = await connect(port)
            for n in (0, 1, 64 * 1024 - 1, MIB, 5 * MIB):
                payload = bytes(range(251)) * (n // 251) + bytes(n % 251)
                result, data = await conn.call("echo", {"n": n}, payload)
                assert result == {"op": "echo", "n": n}
                assert len(data) == n and data == payload[::-1], n
            conn.close()
            # the large ones arrived in place, in a bytearray of their own
            assert seen[-1] is bytearray and seen[-2] is bytearray

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_many_calls_back_to_back_and_from_several_tasks(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            conn = await connect(port)
            for i in range(300):
                payload = bytes([i % 256]) * (i * 37 % 70_000)
                result, data = await conn.call("echo", {"i": i}, payload)
                assert result["n"] == len(payload) and data == payload

            async def caller(k: int) -> None:
                for i in range(50):
                    payload = bytes([k]) * (k * 1000 + i)
                    _, data = await conn.call("echo", {}, payload)
                    assert data == payload

            await asyncio.gather(*(caller(k) for k in range(8)))  # one at a time, on the lock
            assert not conn.closed
            conn.close()

    run(loop_factory, main())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        out += chunk
    return bytes(out)


def _recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    hlen, plen = struct.unpack(">II", _recv_exact(sock, FRAME_HEADER_SIZE))
    return json.loads(_recv_exact(sock, hlen)), _recv_exact(sock, plen)


def _raw_client(port: int) -> socket.socket:
    """A blocking socket that has done the client's side of the handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello, _ = _recv_frame(sock)
    s_nonce, c_nonce = parse_nonce(hello["nonce"]), b"\x01" * 16
    sock.sendall(encode_frame({"node": "b", "nonce": c_nonce.hex(),
                               "proof": proof(KEY, "client", "demo", s_nonce, c_nonce, "b")}))
    answer, _ = _recv_frame(sock)
    assert answer["ok"] is True
    return sock


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_request_dribbled_byte_by_byte(loop_factory: LoopFactory) -> None:
    payload = bytes(range(256)) * 12 + b"end"  # 3 KiB
    big = bytes(range(256)) * 1024  # 256 KiB, in small pieces
    answers: list[tuple[dict[str, Any], bytes]] = []

    def client(port: int) -> None:
        with _raw_client(port) as sock:
            wire = encode_frame({"id": 1, "op": "echo", "args": {}}, payload)
            for i in range(len(wire)):
                sock.send(wire[i : i + 1])
                time.sleep(0.0002)
            answers.append(_recv_frame(sock))
            wire = encode_frame({"id": 2, "op": "echo", "args": {}}, big)
            head = len(wire) - len(big) + 100
            for i in range(head):  # the head and the payload's start one byte at a time ...
                sock.send(wire[i : i + 1])
            for i in range(head, len(wire), 4093):  # ... the rest in odd pieces
                sock.send(wire[i : i + 4093])
                time.sleep(0.0002)
            answers.append(_recv_frame(sock))

    async def main() -> None:
        async with echo_server() as (srv, port):
            thread = threading.Thread(target=client, args=(port,))
            thread.start()
            await until(lambda: not thread.is_alive(), "the client is done", 20)
            thread.join()
            assert answers == [
                ({"id": 1, "ok": True, "result": {"op": "echo", "n": len(payload)}}, payload[::-1]),
                ({"id": 2, "ok": True, "result": {"op": "echo", "n": len(big)}}, big[::-1]),
            ]

    run(loop_factory, main())


async def fake_server(answer: Callable[[asyncio.StreamWriter], Coroutine[Any, Any, None]]) -> tuple[asyncio.Server, int]:
    """A server that does the handshake right, reads one request and lets ``answer`` reply."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s_nonce = b"\x02" * 16
        w.write(encode_frame({"hello": "shoal/1", "cluster": "demo", "node": "a", "nonce": s_nonce.hex()}))
        hlen, plen = struct.unpack(">II", await r.readexactly(FRAME_HEADER_SIZE))
        msg = json.loads(await r.readexactly(hlen))
        c_nonce = parse_nonce(msg["nonce"])
        w.write(encode_frame({"ok": True, "proof": proof(KEY, "server", "demo", s_nonce, c_nonce, "a")}))
        hlen, plen = struct.unpack(">II", await r.readexactly(FRAME_HEADER_SIZE))
        await r.readexactly(hlen + plen)
        await answer(w)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_server_that_closes_mid_payload_fails_the_call(loop_factory: LoopFactory) -> None:
    async def half_then_close(w: asyncio.StreamWriter) -> None:
        head = encode_frame({"id": 1, "ok": True, "result": {}}, b"")
        w.write(struct.pack(">II", len(head) - FRAME_HEADER_SIZE, MIB) + head[FRAME_HEADER_SIZE:])
        w.write(b"x" * (MIB // 2))
        await w.drain()
        w.close()

    async def main() -> None:
        server, port = await fake_server(half_then_close)
        try:
            conn = await connect(port)
            with pytest.raises(ConnectionResetError, match="peer closed the connection"):
                async with asyncio.timeout(5):
                    await conn.call("read", {}, b"req")
            assert conn.closed
            with pytest.raises(ConnectionResetError):
                await conn.call("read", {})
        finally:
            server.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_client_that_closes_mid_payload_ends_its_connection_only(loop_factory: LoopFactory) -> None:
    def half_then_close(port: int) -> None:
        with _raw_client(port) as sock:
            head = encode_frame({"id": 1, "op": "echo", "args": {}})
            sock.sendall(struct.pack(">II", len(head) - FRAME_HEADER_SIZE, MIB) + head[FRAME_HEADER_SIZE:])
            sock.sendall(b"x" * 1000)

    async def main() -> None:
        seen: list[Any] = []
        async with echo_server(seen) as (srv, port):
            await asyncio.to_thread(half_then_close, port)
            await until(lambda: not srv._tasks, "the server let go of the connection")
            assert seen == []  # the handler never saw the cut request
            conn = await connect(port)
            assert (await conn.call("echo", {}, b"ab"))[1] == b"ba"
            conn.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_frame_over_the_limits_closes_the_connection(loop_factory: LoopFactory) -> None:
    def oversized(port: int) -> bytes:
        with _raw_client(port) as sock:
            sock.sendall(struct.pack(">II", MAX_HEADER + 1, 0))
            return sock.recv(100)  # b"": the server closed

    async def main() -> None:
        async with echo_server() as (srv, port):
            assert await asyncio.to_thread(oversized, port) == b""
            await until(lambda: not srv._tasks, "the server let go of the connection")

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_wrong_secret_is_refused_and_counted(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            for i in (1, 2):
                with pytest.raises(AuthenticationFailed, match="wrong cluster secret"):
                    await connect(port, derive_key(b"x" * 32, "demo", "channel"))
                assert srv.refusals == i
            conn = await connect(port)  # the right one still gets in
            assert (await conn.call("echo", {}))[0] == {"op": "echo", "n": 0}
            conn.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_silent_stranger_is_dropped_after_the_handshake_timeout(loop_factory: LoopFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "HANDSHAKE_TIMEOUT_S", 0.2)

    def silent(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            _recv_frame(sock)  # the hello, then say nothing
            return sock.recv(100)

    async def main() -> None:
        async with echo_server() as (srv, port):
            assert await asyncio.to_thread(silent, port) == b""
            assert srv.refusals == 0  # a timeout is not a refusal, as before

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_peer_that_stops_reading_holds_the_writer_in_drain(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        accepting = loop.create_task(loop.sock_accept(listener))
        _, stream = await loop.create_connection(FrameStream, *listener.getsockname())
        peer, _ = await accepting
        try:
            payload = b"p" * (32 * MIB)
            stream.write_frame({"id": 1}, payload)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await stream.drain()  # the peer reads nothing: we wait, not buffer more
            assert stream.transport is not None
            assert 0 < stream.transport.get_write_buffer_size() <= len(payload) + 1024

            async def read_all() -> int:
                got = 0
                while got < len(payload):
                    got += len(await loop.sock_recv(peer, 1 << 20))
                return got

            reading = loop.create_task(read_all())
            await stream.drain()  # the peer reads again: drain returns
            stream.close()
            await stream.wait_closed()
            assert await reading >= len(payload)
        finally:
            peer.close()
            listener.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_cancelled_call_closes_its_connection(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            conn = await connect(port)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await conn.call("sleep", {"s": 1}, b"x" * MIB)
            assert conn.closed
            with pytest.raises(ConnectionResetError, match="is closed"):
                await conn.call("echo", {})
            fresh = await connect(port)
            assert (await fresh.call("echo", {}, b"ok"))[1] == b"ko"
            fresh.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_closing_here_wakes_a_waiting_reader(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            conn = await connect(port)
            call = asyncio.ensure_future(conn.call("sleep", {"s": 5}))
            await asyncio.sleep(0.1)
            conn.stream.close()  # e.g. the agent drops the connection
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(2):
                    await call

    run(loop_factory, main())


# -- payloads that wait in a pipe (spliced to the socket) ------------------------------


def pipe_fill(fds: tuple[int, int]) -> int:
    return unread(fds[0])


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_piped_answer_arrives_whole_and_its_pipe_goes_back_empty(loop_factory: LoopFactory) -> None:
    blocks = [os.urandom(n) for n in (1, 64 * 1024, MIB - 1, MIB)]
    given_out: list[Piped] = []

    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
        p = in_pipe(blocks[int(args["i"])])
        given_out.append(p)
        return {"i": args["i"]}, p

    async def main() -> None:
        async with serving(handler) as (_, port):
            conn = await connect(port)
            for _ in range(3):  # the same pipes again: each was left empty
                for i, block in enumerate(blocks):
                    result, data = await conn.call("read", {"i": i})
                    assert result == {"i": i} and bytes(data) == block, i
            conn.close()
        assert len(given_out) == 12
        assert all(p._pool is None for p in given_out)  # every one was released
        assert POOL._free and all(pipe_fill(fds) == 0 for fds in POOL._free)

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_client_gone_mid_splice_ends_the_connection_and_its_pipe_is_closed(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    given_out: list[Piped] = []
    served = threading.Event()
    write_piped = FrameStream.write_piped

    async def small_send_buffer(self: FrameStream, header: dict[str, Any], payload: Piped) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # so the splice must wait
        await write_piped(self, header, payload)

    monkeypatch.setattr(FrameStream, "write_piped", small_send_buffer)

    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
        p = in_pipe(os.urandom(MIB))
        given_out.append(p)
        served.set()
        return {}, p

    async def main() -> None:
        async with serving(handler) as (_, port):
            # a client that asks, reads a little of the answer, then vanishes
            conn = await connect(port)
            sock = conn.stream.transport.get_extra_info("socket") if conn.stream.transport else None
            assert sock is not None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the splice waits for room
            conn.stream.transport.pause_reading()  # type: ignore[union-attr]
            conn.stream.write_frame({"id": 1, "op": "read", "args": {}})
            await until(served.is_set, "the server answered")
            await asyncio.sleep(0.2)
            conn.stream.transport.abort()  # type: ignore[union-attr]
            await until(lambda: given_out[0]._pool is None, "the server released the pipe")
            free = list(POOL._free)
            # not back in the pool with bytes in it (it was closed)
            assert all(pipe_fill(fds) == 0 for fds in free)
            assert (given_out[0].r, given_out[0].w) not in free
            # the server still serves others
            other = await connect(port)
            _, data = await other.call("read", {})
            assert len(data) == MIB
            other.close()

    run(loop_factory, main())


# -- request payloads received into a pipe (ChannelServer pipe_payload) --------------


@contextlib.asynccontextmanager
async def piping_server(seen: list[tuple[str, int]]) -> AsyncIterator[int]:
    """A server that takes "put" payloads of 64 KiB or more into a pipe. Its handler
    records each payload's type and size, and answers with the payload's bytes
    reversed, except that for "drop" it leaves a pipe as it is (the server must
    release it)."""

    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes]:
        seen.append((type(payload).__name__, len(payload)))
        if isinstance(payload, Piped):
            if args.get("drop"):
                return {"n": len(payload)}, b""
            data = take_out(payload)
        else:
            data = bytes(payload)
        return {"n": len(data)}, data[::-1]

    def wants(header: dict[str, Any], size: int) -> bool:
        return header.get("op") == "put" and size >= 64 * 1024

    async with serving(handler, pipe_payload=wants) as (_, port):
        yield port


@pytest.fixture
def pipes(monkeypatch: pytest.MonkeyPatch) -> list[Taken]:
    """Every pipe the pool hands out during the test."""
    return record_pipes(monkeypatch)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_large_request_payloads_arrive_in_a_pipe_with_their_exact_bytes(
    loop_factory: LoopFactory, pipes: list[Taken]
) -> None:
    seen: list[tuple[str, int]] = []

    async def main() -> None:
        async with piping_server(seen) as port:
            conn = await connect(port)
            cases = [("put", 64 * 1024 - 1), ("put", 64 * 1024), ("put", MIB), ("put", MIB + 1),
                     ("echo", MIB), ("put", 300_001), ("put", 10)]
            for round_ in range(3):  # the pool's pipes again: each went back empty
                for op, n in cases:
                    payload = os.urandom(n)
                    result, data = await conn.call(op, {}, payload)
                    assert result == {"n": n} and bytes(data) == payload[::-1], (round_, op, n)
            # a pipe the handler left full is closed by the server, never pooled
            result, _ = await conn.call("put", {"drop": True}, os.urandom(MIB))
            assert result == {"n": MIB}
            _, data = await conn.call("put", {}, b"after")
            assert bytes(data) == b"retfa"
            conn.close()
        kinds = {(op, n): kind for (op, n), (kind, _) in zip(cases, seen[: len(cases)], strict=True)}
        assert kinds == {("put", 64 * 1024 - 1): "bytearray", ("put", 64 * 1024): "Piped", ("put", MIB): "Piped",
                         ("put", MIB + 1): "bytearray",  # larger than a pipe of the pool
                         ("echo", MIB): "bytearray", ("put", 300_001): "Piped", ("put", 10): "bytes"}
        assert pipes
        assert_no_pipe_leaked(pipes)

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_piped_payload_dribbled_in_small_pieces(loop_factory: LoopFactory) -> None:
    """The socket runs dry again and again mid-payload: the splice waits for more each time."""
    seen: list[tuple[str, int]] = []
    big = os.urandom(400_000)
    answers: list[tuple[dict[str, Any], bytes]] = []

    def client(port: int) -> None:
        with _raw_client(port) as sock:
            wire = encode_frame({"id": 1, "op": "put", "args": {}}, big)
            for i in range(0, len(wire), 8191):
                sock.send(wire[i : i + 8191])
                time.sleep(0.001)
            answers.append(_recv_frame(sock))
            sock.sendall(encode_frame({"id": 2, "op": "put", "args": {}}, b"next"))
            answers.append(_recv_frame(sock))

    async def main() -> None:
        async with piping_server(seen) as port:
            thread = threading.Thread(target=client, args=(port,))
            thread.start()
            await until(lambda: not thread.is_alive(), "the client is done", 30)
            thread.join()
        assert seen == [("Piped", len(big)), ("bytes", 4)]
        assert answers == [({"id": 1, "ok": True, "result": {"n": len(big)}}, big[::-1]),
                           ({"id": 2, "ok": True, "result": {"n": 4}}, b"txen")]
        assert pool_is_clean()

    run(loop_factory, main(), timeout_s=60)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_pipe_that_fills_up_hands_the_payload_over_in_a_buffer(loop_factory: LoopFactory) -> None:
    seen: list[tuple[str, int]] = []

    async def main() -> None:
        # pipes of four pages in the pool: a MiB fills one long before it has all arrived
        POOL.close()
        for _ in range(2):
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(w, F_SETPIPE_SZ, 16384)
            POOL.give((r, w), emptied=True)
        try:
            async with piping_server(seen) as port:
                conn = await connect(port)
                for _ in range(2):
                    payload = os.urandom(MIB)
                    _, data = await conn.call("put", {}, payload)
                    assert bytes(data) == payload[::-1]
                conn.close()
        finally:
            POOL.close()  # the small pipes are not kept for other tests
        assert seen == [("bytearray", MIB)] * 2

    run(loop_factory, main(), timeout_s=60)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_client_gone_mid_payload_closes_the_pipe_and_the_server_goes_on(
    loop_factory: LoopFactory, pipes: list[Taken]
) -> None:
    seen: list[tuple[str, int]] = []

    def client(port: int) -> None:
        with _raw_client(port) as sock:
            wire = encode_frame({"id": 1, "op": "put", "args": {}}, os.urandom(MIB))
            sock.sendall(wire[: len(wire) // 2])
            time.sleep(0.3)  # the server splices what came and waits for the rest

    async def main() -> None:
        async with piping_server(seen) as port:
            thread = threading.Thread(target=client, args=(port,))
            thread.start()
            await until(lambda: not thread.is_alive(), "the client is gone", 20)
            thread.join()
            await until(lambda: bool(pipes) and closed(pipes[0]), "the server closed the half-filled pipe")
            conn = await connect(port)  # others are served as before
            payload = os.urandom(MIB)
            _, data = await conn.call("put", {}, payload)
            assert bytes(data) == payload[::-1]
            conn.close()
        assert seen == [("Piped", MIB)]  # the cut-off request never reached the handler
        assert_no_pipe_leaked(pipes)

    run(loop_factory, main(), timeout_s=60)


# -- calls started from a callback (Connection.start_call) ----------------------------


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_call_started_from_a_callback_gets_its_answer_from_the_receive_callback(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            conn = await connect(port)
            answers: list[tuple[Any, Any, Any]] = []
            block = os.urandom(MIB)

            def then(result: Any, data: bytes | None, err: BaseException | None) -> None:
                answers.append((result, None if data is None else bytes(data), err))

            for i in range(3):
                assert conn.start_call("echo", {"i": i}, then, 10)
                # one call at a time: a second start is refused while the first is out
                assert not conn.start_call("echo", {}, then, 10)
                await until(lambda i=i: len(answers) == i + 1, "the answer")
                assert answers[i] == ({"op": "echo", "n": 0}, b"", None)
            # call() waits for a started call to be answered, then goes on the same connection
            assert conn.start_call("sleep", {"s": 0.2}, then, 10)
            result, data = await conn.call("echo", {}, block)
            assert len(answers) == 4 and answers[3][2] is None, "call() went before the started call ended"
            assert bytes(data) == block[::-1]
            # a refusal is a RemoteError; the connection stays usable
            assert conn.start_call("fail", {}, then, 10)
            await until(lambda: len(answers) == 5, "the refusal")
            assert isinstance(answers[4][2], RemoteError) and not conn.closed
            assert (await conn.call("echo", {}, b"ab"))[1] == b"ba"
            conn.close()
            assert not conn.start_call("echo", {}, then, 10), "a closed connection starts nothing"

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_started_call_that_is_not_answered_in_time_or_whose_peer_goes_fails(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        async with echo_server() as (srv, port):
            answers: list[BaseException | None] = []

            def then(result: Any, data: bytes | None, err: BaseException | None) -> None:
                answers.append(err)

            conn = await connect(port)
            assert conn.start_call("sleep", {"s": 5}, then, 0.2)
            await until(lambda: len(answers) == 1, "the timeout")
            assert isinstance(answers[0], TimeoutError) and conn.closed
            # the peer goes away with a call out: the callback hears of it, soon after
            conn = await connect(port)
            assert conn.start_call("sleep", {"s": 5}, then, 10)
            srv.close()
            for task in list(srv._tasks):
                task.cancel()
            await until(lambda: len(answers) == 2, "the lost connection")
            assert isinstance(answers[1], ConnectionResetError) and conn.closed

    run(loop_factory, main(), timeout_s=60)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_piped_answer_whose_pipe_holds_too_little_ends_the_connection_not_the_server(
    loop_factory: LoopFactory,
) -> None:
    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
        p = in_pipe(b"x" * 1000)
        if op == "short":
            p.length = MIB  # says a MiB; holds 1000 bytes
        return {}, p

    async def main() -> None:
        async with serving(handler) as (_, port):
            conn = await connect(port)
            with pytest.raises((ConnectionResetError, RemoteProtocolError)):
                await asyncio.wait_for(conn.call("short", {}), 10)  # not a wait for ever
            other = await connect(port)
            _, data = await other.call("whole", {})
            assert bytes(data) == b"x" * 1000
            other.close()
        assert pool_is_clean()

    run(loop_factory, main(), timeout_s=60)
