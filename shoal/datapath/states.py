"""States of a volume on a node, with stable names (they appear in the CLI and JSON).

After Windows' Get-ClusterSharedVolumeState::

    direct       data I/O goes straight to the LUN on this node's storage path
    redirected   data I/O travels to the coordinator, which performs it; with reasons:
                   no-disk-connectivity  this node's storage path failed
                   maintenance           the volume is in maintenance mode
                   user-request          an operator asked for it
    paused       I/O that needs the coordinator waits: the role is moving or failing over
    unavailable  this node was fenced (its liveness lease expired): it refuses I/O
                 until it has rejoined

The state is *derived* from facts (is the path up, is a coordinator known, reasons,
fenced) by :func:`derive`, a pure function, so it is always consistent with them;
:class:`StateLog` records each change from→to with the sentence why.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class VolumeState(enum.StrEnum):
    DIRECT = "direct"
    REDIRECTED = "redirected"
    PAUSED = "paused"
    UNAVAILABLE = "unavailable"


class Reason(enum.StrEnum):
    NO_DISK_CONNECTIVITY = "no-disk-connectivity"
    MAINTENANCE = "maintenance"
    USER_REQUEST = "user-request"


@dataclass(frozen=True)
class Facts:
    path_up: bool
    coordinator_known: bool
    reasons: frozenset[Reason]
    fenced: bool = False


def derive(f: Facts) -> VolumeState:
    if f.fenced:
        return VolumeState.UNAVAILABLE
    if not f.coordinator_known:
        return VolumeState.PAUSED
    if f.reasons or not f.path_up:
        return VolumeState.REDIRECTED
    return VolumeState.DIRECT


@dataclass
class Counters:
    direct_bytes: int = 0
    direct_requests: int = 0
    redirected_bytes: int = 0
    redirected_requests: int = 0
    #: as coordinator: block requests performed for other nodes
    served_bytes: int = 0
    served_requests: int = 0
    #: of those, reads whose data went from the target's socket to the node's through
    #: a pipe (splice: not copied by the coordinator)
    served_spliced: int = 0
    #: and writes whose data went from the node's socket to the target's through a pipe
    served_spliced_writes: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StateLog:
    volume: str
    node: str
    state: VolumeState = VolumeState.PAUSED
    since: float = field(default_factory=time.monotonic)
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))

    def update(self, new: VolumeState, why: str) -> bool:
        if new is self.state:
            return False
        old, self.state, self.since = self.state, new, time.monotonic()
        self.history.append({"t": time.time(), "old": old.value, "new": new.value, "why": why})
        log.warning("%s on %s: %s -> %s: %s", self.volume, self.node, old.value, new.value, why)
        return True
