"""Authenticated request/response channel between node agents (asyncio TCP).

Connection = handshake (mutual HMAC challenge, see ``protocol``) + frames.
A request frame header is ``{"id", "op", "args"}``; the answer is
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error"}``; either may
carry a binary payload (block I/O arrives with the redirected data path).
A connection carries one request at a time; callers that need concurrency
open several or wait on the lock.

This module takes no timeouts of its own except where it must bound a
handshake with a stranger; callers wrap calls in ``asyncio.timeout()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.netft.errors import (
    AuthenticationFailed,
    NetftError,
    RemoteError,
    RemoteProtocolError,
)
from shoal.netft.protocol import (
    FRAME_HEADER_SIZE,
    check_proof,
    decode_frame_sizes,
    decode_header,
    encode_frame,
    encode_frame_head,
    parse_nonce,
    proof,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
#: a stream buffers this much before it stops reading: a 1 MiB redirected block
#: arrives without a pause/resume of the socket every 128 KiB (asyncio's default)
STREAM_LIMIT = 4 << 20

Handler = Callable[[str, str, dict[str, Any], bytes], Awaitable[tuple[Any, bytes]]]


def write_frame(w: asyncio.StreamWriter, header: dict[str, Any], payload: bytes = b"") -> None:
    """Like ``w.write(encode_frame(...))`` without copying the payload into one buffer."""
    if len(payload) < 65536:
        w.write(encode_frame(header, payload))
    else:
        w.write(encode_frame_head(header, len(payload)))
        w.write(payload)


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    try:
        prefix = await reader.readexactly(FRAME_HEADER_SIZE)
        hlen, plen = decode_frame_sizes(prefix)
        header = decode_header(await reader.readexactly(hlen))
        payload = await reader.readexactly(plen) if plen else b""
    except asyncio.IncompleteReadError as err:
        raise ConnectionResetError("peer closed the connection") from err
    return header, payload


class ChannelServer:
    """Accepts agents that prove they hold the cluster secret; refuses and logs others."""

    def __init__(self, cluster: str, node: str, key: bytes, handler: Handler):
        self.cluster = cluster
        self.node = node
        self.key = key
        self.handler = handler
        self.servers: dict[str, asyncio.Server] = {}
        self.refusals = 0

    async def listen(self, network: str, address: str, port: int) -> None:
        if network in self.servers:
            return
        self.servers[network] = await asyncio.start_server(
            lambda r, w: self._serve(network, r, w), address, port, reuse_address=True, limit=STREAM_LIMIT
        )

    def close(self, network: str | None = None) -> None:
        for net in [network] if network else list(self.servers):
            srv = self.servers.pop(net, None)
            if srv is not None:
                srv.close()

    async def _serve(self, network: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        source = str(w.get_extra_info("peername", ("?",))[0])
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                peer = await self._handshake(network, source, r, w)
            if peer is None:
                return
            while True:
                header, payload = await read_frame(r)
                result_payload = b""
                try:
                    result, result_payload = await self.handler(
                        peer, str(header.get("op")), dict(header.get("args") or {}), payload
                    )
                    answer: dict[str, Any] = {"id": header.get("id"), "ok": True, "result": result}
                except NetftError as err:
                    answer = {"id": header.get("id"), "ok": False, "error": str(err)}
                except Exception as err:  # a bug on our side: tell the peer, keep serving
                    log.exception("request %s from %s failed", header.get("op"), peer)
                    answer = {"id": header.get("id"), "ok": False, "error": f"internal error: {err}"}
                write_frame(w, answer, result_payload)
                await w.drain()
        except (OSError, TimeoutError, RemoteProtocolError):
            pass
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def _handshake(
        self, network: str, source: str, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> str | None:
        s_nonce = os.urandom(16)
        w.write(encode_frame({"hello": "shoal/1", "cluster": self.cluster, "node": self.node,
                              "nonce": s_nonce.hex()}))
        await w.drain()
        msg, _ = await read_frame(r)
        peer = str(msg.get("node", "?"))
        try:
            c_nonce = parse_nonce(msg.get("nonce"))
        except RemoteProtocolError:
            c_nonce = b""
        expected = proof(self.key, "client", self.cluster, s_nonce, c_nonce, peer)
        if not c_nonce or not check_proof(expected, msg.get("proof")):
            self.refusals += 1
            log.warning(
                "refused agent connection on %s from %s claiming to be %s: it does not prove "
                "it holds the secret of cluster %s",
                network, source, peer, self.cluster,
            )
            w.write(encode_frame({"ok": False, "error": f"{self.node} refused {peer}: wrong cluster secret "
                                  f"(not the secret of cluster {self.cluster})"}))
            await w.drain()
            return None
        w.write(encode_frame({"ok": True, "proof": proof(self.key, "server", self.cluster, s_nonce,
                                                         c_nonce, self.node)}))
        await w.drain()
        return peer


class Connection:
    """Client side of one authenticated connection to one peer on one network."""

    def __init__(self, peer: str, network: str, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        self.peer = peer
        self.network = network
        self.r = r
        self.w = w
        self.lock = asyncio.Lock()
        self.next_id = 0
        self.broken = False

    @classmethod
    async def open(
        cls, cluster: str, node: str, key: bytes, peer: str, network: str, address: str, port: int
    ) -> Connection:
        r, w = await asyncio.open_connection(address, port, limit=STREAM_LIMIT)
        try:
            hello, _ = await read_frame(r)
            if hello.get("hello") != "shoal/1":
                raise RemoteProtocolError(f"{address}:{port} does not speak the shoal agent protocol")
            if hello.get("cluster") != cluster or hello.get("node") != peer:
                raise AuthenticationFailed(
                    f"{address}:{port} is {hello.get('node')!r} of cluster {hello.get('cluster')!r}, "
                    f"not {peer!r} of {cluster!r}; check the addresses in the configuration"
                )
            s_nonce = parse_nonce(hello.get("nonce"))
            c_nonce = os.urandom(16)
            w.write(encode_frame({"node": node, "nonce": c_nonce.hex(),
                                  "proof": proof(key, "client", cluster, s_nonce, c_nonce, node)}))
            await w.drain()
            answer, _ = await read_frame(r)
            if not answer.get("ok"):
                raise AuthenticationFailed(
                    f"{answer.get('error', 'refused')}; this node's cluster secret differs from {peer}'s"
                )
            if not check_proof(proof(key, "server", cluster, s_nonce, c_nonce, peer), answer.get("proof")):
                raise AuthenticationFailed(
                    f"{peer} at {address} could not prove it holds the cluster secret; refusing it"
                )
        except BaseException:
            w.close()
            raise
        return cls(peer, network, r, w)

    @property
    def closed(self) -> bool:
        """Broken (a call was cut off or the peer broke the protocol) or closed: do not reuse."""
        return self.broken or self.w.is_closing()

    async def call(self, op: str, args: dict[str, Any], payload: bytes = b"") -> tuple[Any, bytes]:
        """One request and its answer.

        If anything interrupts the call once it started (an error, a timeout or a
        cancellation), the request and answer streams may be out of step: the
        connection is marked broken and closed, and the caller must open a new one.
        """
        async with self.lock:
            if self.closed:
                raise ConnectionResetError(f"connection to {self.peer} is closed")
            self.next_id += 1
            rid = self.next_id
            try:
                write_frame(self.w, {"id": rid, "op": op, "args": args}, payload)
                await self.w.drain()
                header, data = await read_frame(self.r)
                if header.get("id") != rid:
                    raise RemoteProtocolError(f"{self.peer} answered request {header.get('id')}, not {rid}")
            except BaseException:
                self.close()
                raise
        if not header.get("ok"):
            raise RemoteError(f"{self.peer}: {header.get('error')}")
        return header.get("result"), data

    def close(self) -> None:
        self.broken = True
        self.w.close()
