"""Wire formats we own, as pure functions (no sockets, no clocks).

Heartbeat datagram (UDP, big-endian), 48 bytes::

    0   4  magic  b"SHB1"
    4   2  sender node id
    6   2  receiver node id
    8   4  network tag: crc32 of the network name
    12  1  flags: bit 0 = "I hear you" (sender received us recently on this network)
    13  3  reserved, zero
    16  8  boot id of the sender (wall-clock ns at its process start)
    24  8  sequence number, per (sender boot, receiver, network), increasing
    32 16  HMAC-SHA256 over bytes 0..31 with the heartbeat key, truncated

Keys are derived from the cluster secret and the cluster name, one per purpose,
so a heartbeat MAC can never be replayed as a channel proof.

Channel handshake (the agent-to-agent TCP channel), a mutual HMAC challenge::

    server -> client   {"hello": "shoal/1", "cluster", "node", "nonce": S}
    client -> server   {"node", "nonce": C, "proof": HMAC(k, "client"|cluster|S|C|client node)}
    server -> client   {"ok": true, "proof": HMAC(k, "server"|cluster|S|C|server node)}
                       or {"ok": false, "error": sentence}, then close

Frames after the handshake: u32 header length, u32 payload length, a JSON
header, then the binary payload (empty for plain requests; block I/O later).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from shoal.netft.errors import RemoteProtocolError

HB_MAGIC = b"SHB1"
_HB = struct.Struct(">4sHHIB3xQQ")
HB_SIZE = _HB.size + 16
FLAG_HEAR_YOU = 0x01


def derive_key(secret: bytes, cluster: str, purpose: str) -> bytes:
    return hmac.new(secret, f"shoal/{purpose}/{cluster}".encode(), hashlib.sha256).digest()


def network_tag(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class Heartbeat:
    sender: int
    receiver: int
    network_tag: int
    hears_you: bool
    boot_id: int
    seq: int


class BadHeartbeat(Exception):
    """A datagram that is not a valid heartbeat; ``reason`` says why."""

    def __init__(self, reason: str, sender: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.sender = sender


def encode_heartbeat(hb: Heartbeat, key: bytes) -> bytes:
    body = _HB.pack(
        HB_MAGIC,
        hb.sender,
        hb.receiver,
        hb.network_tag,
        FLAG_HEAR_YOU if hb.hears_you else 0,
        hb.boot_id,
        hb.seq,
    )
    return body + hmac.new(key, body, hashlib.sha256).digest()[:16]


def decode_heartbeat(data: bytes, key: bytes) -> Heartbeat:
    if len(data) != HB_SIZE or data[:4] != HB_MAGIC:
        raise BadHeartbeat("not a shoal heartbeat")
    body, mac = data[: _HB.size], data[_HB.size :]
    magic, sender, receiver, tag, flags, boot, seq = _HB.unpack(body)
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest()[:16], mac):
        raise BadHeartbeat("bad authentication code", sender)
    return Heartbeat(sender, receiver, tag, bool(flags & FLAG_HEAR_YOU), boot, seq)


# -- channel handshake -------------------------------------------------------


def proof(key: bytes, side: str, cluster: str, s_nonce: bytes, c_nonce: bytes, node: str) -> str:
    msg = b"|".join([side.encode(), cluster.encode(), s_nonce, c_nonce, node.encode()])
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


NONCE_SIZE = 16
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_nonce(value: Any) -> bytes:
    """A handshake nonce from the wire: exactly NONCE_SIZE bytes as hex, else RemoteProtocolError."""
    if not isinstance(value, str) or len(value) != 2 * NONCE_SIZE or not set(value) <= _HEX:
        raise RemoteProtocolError("peer sent a handshake nonce that is not 16 bytes of hex")
    return bytes.fromhex(value)


def check_proof(expected: str, got: Any) -> bool:
    # compare_digest raises TypeError on non-ASCII str: check the shape first
    return (isinstance(got, str) and len(got) == len(expected) and got.isascii()
            and hmac.compare_digest(expected, got))


_FRAME = struct.Struct(">II")
FRAME_HEADER_SIZE = _FRAME.size
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return encode_frame_head(header, len(payload)) + payload


def encode_frame_head(header: dict[str, Any], payload_length: int) -> bytes:
    """A frame without its payload: the sizes and the JSON header."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(len(h), payload_length) + h


def decode_frame_sizes(prefix: bytes) -> tuple[int, int]:
    hlen, plen = _FRAME.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise RemoteProtocolError(f"peer sent a frame of {hlen}+{plen} bytes, over the limit")
    return hlen, plen


def decode_header(raw: bytes) -> dict[str, Any]:
    try:
        h = json.loads(raw)
    except ValueError as err:
        raise RemoteProtocolError("peer sent a frame header that is not JSON") from err
    if not isinstance(h, dict):
        raise RemoteProtocolError("peer sent a frame header that is not an object")
    return h
