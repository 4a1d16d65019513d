"""The state of one link (this node, one peer, one network), without I/O.

States (stable names, they appear in JSON): ``down``, ``joining``, ``up``.

* A link starts ``down``.
* A valid heartbeat in which the peer says it hears us moves ``down`` to
  ``joining``; ``link_up_after`` such heartbeats in a row, each less than two
  intervals after the previous one, make it ``up`` (hysteresis).
* ``up`` or ``joining`` goes ``down`` when no valid heartbeat arrived for
  ``heartbeat_interval_s * heartbeat_threshold`` seconds (the receiver's
  monotonic clock), or when the peer says it no longer hears us (a one-way
  link is not a link).

Heartbeats carry the sender's "I hear you" bit, which is whether the sender
received anything from us on that network within the threshold. It depends on
reception only, not on the link state, so two nodes never wait on each other.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from shoal.config.timing import Timing

log = logging.getLogger(__name__)


class LinkState(enum.StrEnum):
    DOWN = "down"
    JOINING = "joining"
    UP = "up"


_TRANSITIONS: dict[LinkState, set[LinkState]] = {
    LinkState.DOWN: {LinkState.JOINING, LinkState.UP},
    LinkState.JOINING: {LinkState.UP, LinkState.DOWN},
    LinkState.UP: {LinkState.DOWN},
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Link:
    peer: str
    network: str
    timing: Timing
    on_change: Callable[[Link, LinkState, LinkState], None] | None = None
    state: LinkState = LinkState.DOWN
    last_rx: float | None = None  # monotonic time of the last valid heartbeat
    good_in_a_row: int = 0
    peer_hears_us: bool = False

    def hears(self, now: float) -> bool:
        """What we put in our heartbeats' "I hear you" bit."""
        return self.last_rx is not None and now - self.last_rx <= self.timing.link_down_after_s

    def _set_state(self, new: LinkState, why: str) -> None:
        old = self.state
        if new == old:
            return
        if new not in _TRANSITIONS[old]:
            raise IllegalTransition(f"link {self.peer}/{self.network}: {old} -> {new}")
        self.state = new
        log.info("link to %s on %s: %s -> %s (%s)", self.peer, self.network, old, new, why)
        if self.on_change is not None:
            self.on_change(self, old, new)

    def on_heartbeat(self, now: float, peer_hears_us: bool) -> None:
        prev = self.last_rx
        self.last_rx = now
        self.peer_hears_us = peer_hears_us
        if not peer_hears_us:
            self.good_in_a_row = 0
            if self.state is not LinkState.DOWN:
                self._set_state(LinkState.DOWN, "peer does not hear us")
            return
        if self.state is LinkState.UP:
            return
        gap_ok = prev is not None and now - prev <= 2 * self.timing.heartbeat_interval_s
        self.good_in_a_row = self.good_in_a_row + 1 if gap_ok else 1
        if self.good_in_a_row >= self.timing.link_up_after:
            self._set_state(LinkState.UP, f"{self.good_in_a_row} good heartbeats")
        elif self.state is LinkState.DOWN:
            self._set_state(LinkState.JOINING, "heartbeat received")

    def on_tick(self, now: float) -> None:
        if self.state is LinkState.DOWN:
            return
        if self.last_rx is None or now - self.last_rx > self.timing.link_down_after_s:
            self.good_in_a_row = 0
            self._set_state(
                LinkState.DOWN, f"{self.timing.heartbeat_threshold} heartbeats missed"
            )

    def age(self, now: float) -> float | None:
        return None if self.last_rx is None else now - self.last_rx
