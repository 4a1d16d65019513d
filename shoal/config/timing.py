"""Named timeouts of the cluster, with units in their names, and their relations.

Every timing knob of the cluster networks lives here so that the relations
between them can be checked in one place when the configuration is loaded:

* a link is declared down after ``heartbeat_threshold`` heartbeats in a row are
  missed, i.e. after ``link_down_after_s = heartbeat_interval_s * heartbeat_threshold``
  without a valid heartbeat (judged on the receiver's monotonic clock);
* a link that is down comes back after ``link_up_after`` consecutive good
  heartbeats (hysteresis), so one stray datagram does not flap the route;
* an RPC connect attempt on a route must give up before NetFT would have
  declared the link down (``rpc_connect_timeout_s < link_down_after_s``),
  otherwise failover of internal traffic is slower than link detection;
* an RPC call may not time out before its connect did.

Shared volumes have one knob, ``io_timeout_s`` (T): the longest a single I/O to
the LUN may take before the path counts as failed. Lease timing derives from it
(``shoal.volume.lease.LeaseTiming``), in the order the design requires: a node
renews its liveness slot every 2T, a holder that could not renew for 4T stops
every metadata write, and others may take over only after 8T without change.
T is checked to lie between 0.1 and 60 s. It is deliberately not tied to
``link_down_after_s``: a node is dead only when it answers on no network *and*
its slot stops advancing, so failover of a dead coordinator takes about the
longer of ``link_down_after_s`` and 8T.

Profiles: ``default`` is Windows Server 2008 R2 (1 s, 5 missed) with T = 1 s;
``relaxed`` is what later Windows used on busy networks (1 s, 10 missed) with
T = 2 s; ``fast`` is for tests (0.2 s, 5 missed, T = 0.5 s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

IO_TIMEOUT_MIN_S = 0.1
IO_TIMEOUT_MAX_S = 60.0


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 1.0
    heartbeat_threshold: int = 5
    link_up_after: int = 3
    rpc_connect_timeout_s: float = 2.0
    rpc_call_timeout_s: float = 5.0
    io_timeout_s: float = 1.0

    @property
    def link_down_after_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_threshold

    @property
    def tick_s(self) -> float:
        """How often link deadlines are checked: fine enough not to add to detection."""
        return min(0.1, self.heartbeat_interval_s / 5)

    def problems(self) -> list[str]:
        """One sentence per contradiction; empty when the timing is consistent."""
        out: list[str] = []
        if not 0.05 <= self.heartbeat_interval_s <= 60:
            out.append(
                f"heartbeat_interval_s is {self.heartbeat_interval_s}; it must be between 0.05 and 60 seconds."
            )
        if self.heartbeat_threshold < 2:
            out.append(
                f"heartbeat_threshold is {self.heartbeat_threshold}; at least 2 missed heartbeats "
                "must be tolerated, or one lost datagram takes a link down."
            )
        if self.link_up_after < 1:
            out.append(f"link_up_after is {self.link_up_after}; it must be at least 1 heartbeat.")
        if self.rpc_connect_timeout_s <= 0:
            out.append("rpc_connect_timeout_s must be positive.")
        elif self.rpc_connect_timeout_s >= self.link_down_after_s:
            out.append(
                f"rpc_connect_timeout_s ({self.rpc_connect_timeout_s} s) must be shorter than the time "
                f"a link takes to be declared down (heartbeat_interval_s × heartbeat_threshold = "
                f"{self.link_down_after_s:g} s), or internal traffic fails over slower than NetFT notices."
            )
        if self.rpc_call_timeout_s < self.rpc_connect_timeout_s:
            out.append(
                f"rpc_call_timeout_s ({self.rpc_call_timeout_s} s) is shorter than "
                f"rpc_connect_timeout_s ({self.rpc_connect_timeout_s} s); a call cannot end before its connect."
            )
        if not IO_TIMEOUT_MIN_S <= self.io_timeout_s <= IO_TIMEOUT_MAX_S:
            out.append(
                f"io_timeout_s is {self.io_timeout_s}; it must be between {IO_TIMEOUT_MIN_S:g} and "
                f"{IO_TIMEOUT_MAX_S:g} seconds (leases renew every 2×, take-over waits 8× that)."
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


PROFILES: dict[str, Timing] = {
    "default": Timing(),
    "relaxed": Timing(heartbeat_threshold=10, io_timeout_s=2.0),
    "fast": Timing(
        heartbeat_interval_s=0.2,
        heartbeat_threshold=5,
        link_up_after=3,
        rpc_connect_timeout_s=0.5,
        rpc_call_timeout_s=2.0,
        io_timeout_s=0.5,
    ),
}


def timing_from_table(table: dict[str, Any]) -> tuple[Timing, str, list[str]]:
    """Build a Timing from a ``[timing]`` table: a profile plus overrides.

    Returns (timing, profile name, problems).
    """
    problems: list[str] = []
    profile = table.get("profile", "default")
    if not isinstance(profile, str) or profile not in PROFILES:
        problems.append(
            f"[timing] profile {profile!r} is unknown; use one of {', '.join(sorted(PROFILES))}."
        )
        profile = "default"
    timing = PROFILES[profile]
    overrides: dict[str, Any] = {}
    for key, value in table.items():
        if key == "profile":
            continue
        if key not in Timing.field_names():
            problems.append(
                f"[timing] has an unknown key {key!r}; known keys are profile, "
                f"{', '.join(Timing.field_names())}."
            )
            continue
        want_int = key in ("heartbeat_threshold", "link_up_after")
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            want_int and not isinstance(value, int)
        ):
            kind = "a whole number" if want_int else "a number of seconds"
            problems.append(f"[timing] {key} must be {kind}, not {value!r}.")
            continue
        if not math.isfinite(value):
            problems.append(f"[timing] {key} must be a finite number, not {value!r}.")
            continue
        overrides[key] = float(value) if not want_int else int(value)
    timing = replace(timing, **overrides)
    problems.extend(timing.problems())
    return timing, profile, problems
