"""Heartbeat datagrams and the channel handshake, without sockets; then the real
asyncio channel on loopback with a right and a wrong secret."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from shoal.netft.channel import ChannelServer, Connection
from shoal.netft.errors import AuthenticationFailed, RemoteError
from shoal.netft.protocol import (
    HB_SIZE,
    BadHeartbeat,
    Heartbeat,
    decode_heartbeat,
    derive_key,
    encode_heartbeat,
)

KEY = derive_key(b"s" * 32, "demo", "heartbeat")


def test_heartbeat_round_trip() -> None:
    hb = Heartbeat(1, 2, 0xDEADBEEF, True, 42, 7)
    data = encode_heartbeat(hb, KEY)
    assert len(data) == HB_SIZE
    assert decode_heartbeat(data, KEY) == hb


def test_wrong_secret_and_tampering_are_refused() -> None:
    data = encode_heartbeat(Heartbeat(3, 1, 5, False, 1, 1), KEY)
    other = derive_key(b"t" * 32, "demo", "heartbeat")
    with pytest.raises(BadHeartbeat) as exc:
        decode_heartbeat(data, other)
    assert exc.value.sender == 3 and "authentication" in exc.value.reason
    flipped = data[:12] + bytes([data[12] ^ 1]) + data[13:]
    with pytest.raises(BadHeartbeat):
        decode_heartbeat(flipped, KEY)
    # keys are per purpose and per cluster
    assert derive_key(b"s" * 32, "demo", "channel") != KEY != derive_key(b"s" * 32, "other", "heartbeat")


@given(hs.binary(max_size=100))
def test_garbage_never_decodes(data: bytes) -> None:
    with pytest.raises(BadHeartbeat):
        decode_heartbeat(data, KEY)


async def _pair(server_secret: bytes, client_secret: bytes) -> tuple[ChannelServer, Any]:
    async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes) -> tuple[Any, bytes]:
        if op == "fail":
            raise RemoteError("asked to fail")
        return {"peer": peer, "op": op, "args": args}, payload[::-1]

    srv = ChannelServer("demo", "a", derive_key(server_secret, "demo", "channel"), handler)
    await srv.listen("cluster", "127.0.0.1", 0)
    port = srv.servers["cluster"].sockets[0].getsockname()[1]

    async def connect() -> Connection:
        return await Connection.open("demo", "b", derive_key(client_secret, "demo", "channel"), "a",
                                     "cluster", "127.0.0.1", port)

    return srv, connect


def test_channel_authenticated_call() -> None:
    async def main() -> None:
        srv, connect = await _pair(b"k" * 32, b"k" * 32)
        try:
            conn = await connect()
            result, data = await conn.call("hello", {"x": 1}, b"abc")
            assert result == {"peer": "b", "op": "hello", "args": {"x": 1}} and data == b"cba"
            with pytest.raises(RemoteError, match="asked to fail"):
                await conn.call("fail", {})
            conn.close()
        finally:
            srv.close()

    asyncio.run(main())


def test_channel_wrong_secret_refused_and_counted() -> None:
    async def main() -> None:
        srv, connect = await _pair(b"k" * 32, b"x" * 32)
        try:
            with pytest.raises(AuthenticationFailed, match="wrong cluster secret"):
                await connect()
            assert srv.refusals == 1
        finally:
            srv.close()

    asyncio.run(main())


def test_call_cut_off_mid_flight_breaks_the_connection_not_the_next_call() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes) -> tuple[Any, bytes]:
            if op == "slow":
                await release.wait()
            return {"op": op}, b""

        srv = ChannelServer("demo", "a", derive_key(b"k" * 32, "demo", "channel"), handler)
        await srv.listen("cluster", "127.0.0.1", 0)
        port = srv.servers["cluster"].sockets[0].getsockname()[1]
        try:
            conn = await Connection.open("demo", "b", derive_key(b"k" * 32, "demo", "channel"), "a",
                                         "cluster", "127.0.0.1", port)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await conn.call("slow", {})  # request sent, answer never read
            release.set()
            assert conn.closed  # out of step for good: closed, never reused
            with pytest.raises(ConnectionResetError):
                await conn.call("fast", {})
            fresh = await Connection.open("demo", "b", derive_key(b"k" * 32, "demo", "channel"), "a",
                                          "cluster", "127.0.0.1", port)
            assert (await fresh.call("fast", {}))[0] == {"op": "fast"}
            fresh.close()
        finally:
            srv.close()

    asyncio.run(main())


def test_handshake_fields_are_validated() -> None:
    from shoal.netft.errors import RemoteProtocolError
    from shoal.netft.protocol import check_proof, encode_frame, parse_nonce

    with pytest.raises(RemoteProtocolError):
        parse_nonce("zz")
    with pytest.raises(RemoteProtocolError):
        parse_nonce("ab" * 15 + " a")
    with pytest.raises(RemoteProtocolError):
        parse_nonce(None)
    assert parse_nonce("ab" * 16) == b"\xab" * 16
    assert check_proof("ab" * 32, "é" * 64) is False  # was TypeError from compare_digest
    assert check_proof("ab" * 32, "ab") is False

    async def main() -> None:
        # a stranger that answers the client's connect with a malformed nonce
        async def fake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(encode_frame({"hello": "shoal/1", "cluster": "demo", "node": "a", "nonce": "zz"}))
            await w.drain()
            await asyncio.sleep(1)
            w.close()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RemoteProtocolError):
                await Connection.open("demo", "b", b"k" * 32, "a", "cluster", "127.0.0.1", port)
        finally:
            server.close()

        # a client with a non-ASCII proof is refused like a wrong secret, no traceback
        srv, _ = await _pair(b"k" * 32, b"k" * 32)
        port = srv.servers["cluster"].sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await _read_raw_frame(r)
            w.write(encode_frame({"node": "b", "nonce": "cd" * 16, "proof": "é" * 64}))
            await w.drain()
            answer = await _read_raw_frame(r)
            assert answer["ok"] is False and srv.refusals == 1
            w.close()
        finally:
            srv.close()

    asyncio.run(main())


async def _read_raw_frame(r: asyncio.StreamReader) -> dict[str, Any]:
    """A frame's header, read the plain way (payload skipped)."""
    from shoal.netft.protocol import FRAME_HEADER_SIZE, decode_frame_sizes, decode_header

    hlen, plen = decode_frame_sizes(await r.readexactly(FRAME_HEADER_SIZE))
    header = decode_header(await r.readexactly(hlen))
    await r.readexactly(plen)
    return header
