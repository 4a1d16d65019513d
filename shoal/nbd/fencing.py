"""Fencing, without I/O: the NBD analogue of SCSI-3 persistent reservations.

A *holder* (a node) opens each connection with ``NBD_OPT_SHOAL_REGISTER``
carrying ``{"holder": "node2", "key": 7}``; ``key`` is the holder's current
registration key (an epoch handed out by whoever decides who may write). When
another node must take over, it sends ``NBD_OPT_SHOAL_PREEMPT`` carrying
``{"holder": "node2", "below": 8}``, the analogue of PREEMPT AND ABORT:

- the holder's *floor* rises to ``max(floor, below)``; floors never fall;
- every connection registered as that holder with a key below the floor is
  aborted (the server does this; see ``server.py``);
- from then on REGISTER as that holder with a key below the floor is refused
  with ``NBD_REP_ERR_POLICY`` and the sentence of :meth:`FloorTable.refusal`.

The invariant the server keeps, and the reason the order matters: **once a
PREEMPT is acknowledged, no request sent on a fenced connection is executed
afterwards**; requests that had already reached the backend have completed.
Connections that never registered are not affected by fencing at all.

Floors live in the serving process's memory, one table for all its exports. A
restarted target has forgotten them: holders must take keys from a counter that
only grows (a coordinator epoch), never reuse an old one.

Both payloads are UTF-8 JSON objects (unknown fields are ignored)::

    REGISTER  {"holder": str, "key": int}     holder: 1-64 printable characters
    PREEMPT   {"holder": str, "below": int}   key, below: 0 <= n < 2**64
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_HOLDER_CHARS = 64
MAX_KEY = (1 << 64) - 1
#: longer REGISTER/PREEMPT payloads are refused (a valid one is far shorter)
MAX_PAYLOAD = 1024


@dataclass(frozen=True)
class Registration:
    """A connection's claim: it does I/O for ``holder`` under ``key``."""

    holder: str
    key: int


@dataclass(frozen=True)
class PreemptOrder:
    """Fence every registration of ``holder`` with a key below ``below``."""

    holder: str
    below: int


def check_holder(holder: object) -> str:
    if not isinstance(holder, str) or not 1 <= len(holder) <= MAX_HOLDER_CHARS:
        raise ValueError(f"holder must be a string of 1 to {MAX_HOLDER_CHARS} characters")
    if not holder.isprintable():
        raise ValueError("holder must contain printable characters only")
    return holder


def check_key(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_KEY:
        raise ValueError(f"{field} must be an integer from 0 to 2**64-1")
    return value


def encode_register(reg: Registration) -> bytes:
    return _encode({"holder": check_holder(reg.holder), "key": check_key("key", reg.key)})


def encode_preempt(order: PreemptOrder) -> bytes:
    return _encode(
        {"holder": check_holder(order.holder), "below": check_key("below", order.below)}
    )


def parse_register(data: bytes) -> Registration:
    """Decode a REGISTER payload; ValueError says what is wrong with it."""
    obj = _decode(data, "key")
    return Registration(check_holder(obj.get("holder")), check_key("key", obj["key"]))


def parse_preempt(data: bytes) -> PreemptOrder:
    """Decode a PREEMPT payload; ValueError says what is wrong with it."""
    obj = _decode(data, "below")
    return PreemptOrder(check_holder(obj.get("holder")), check_key("below", obj["below"]))


def _encode(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _decode(data: bytes, number: str) -> dict[str, object]:
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"payload is {len(data)} bytes; the limit is {MAX_PAYLOAD}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ValueError("payload is not UTF-8 JSON") from err
    if not isinstance(obj, dict) or "holder" not in obj or number not in obj:
        raise ValueError(f'payload must be a JSON object with "holder" and "{number}"')
    return obj


class FloorTable:
    """Per holder, the lowest registration key still allowed to do I/O."""

    def __init__(self) -> None:
        self._floors: dict[str, int] = {}

    def floor(self, holder: str) -> int:
        return self._floors.get(holder, 0)

    def fenced(self, reg: Registration) -> bool:
        return reg.key < self.floor(reg.holder)

    def refusal(self, reg: Registration) -> str | None:
        """The sentence a fenced REGISTER is refused with, or None if it may proceed."""
        if not self.fenced(reg):
            return None
        return (
            f"holder {reg.holder} is fenced below key {self.floor(reg.holder)}; "
            "register with a newer key"
        )

    def raise_floor(self, order: PreemptOrder) -> int:
        """Apply a PREEMPT; returns the holder's floor now (never lower than before)."""
        floor = max(self.floor(order.holder), order.below)
        self._floors[order.holder] = floor
        return floor

    def snapshot(self) -> dict[str, int]:
        return dict(self._floors)
