"""Membership: which nodes are up, as this node sees them.

States (stable names, they appear in JSON and the API):

* ``up``        at least one cluster network link to the node is up;
* ``down``      no heartbeat on any network (and, once shared volumes exist,
                its disk liveness slot stopped advancing);
* ``isolated``  no heartbeat on any network but its disk liveness slot still
                advances: alive, cut off; its VMs must not be restarted elsewhere.
                Decided by the shared-volume code (every node watches every peer's
                slot), through ``Membership.update(..., disk_alive=True)``.

All changes go through ``Membership._set_state`` which checks the transition
table, logs from→to and calls the listeners.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class NodeState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    ISOLATED = "isolated"


_TRANSITIONS: dict[NodeState, set[NodeState]] = {
    NodeState.DOWN: {NodeState.UP, NodeState.ISOLATED},
    NodeState.UP: {NodeState.DOWN, NodeState.ISOLATED},
    NodeState.ISOLATED: {NodeState.UP, NodeState.DOWN},
}


class IllegalTransition(RuntimeError):
    pass


Listener = Callable[[str, NodeState, NodeState], None]


@dataclass
class Membership:
    me: str
    peers: list[str]
    states: dict[str, NodeState] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)

    def __post_init__(self) -> None:
        now = time.monotonic()
        self.states[self.me] = NodeState.UP
        self.since[self.me] = now
        for p in self.peers:
            self.states.setdefault(p, NodeState.DOWN)
            self.since.setdefault(p, now)

    def state(self, node: str) -> NodeState:
        return self.states[node]

    def _set_state(self, node: str, new: NodeState, why: str) -> None:
        old = self.states[node]
        if old == new:
            return
        if new not in _TRANSITIONS[old]:
            raise IllegalTransition(f"node {node}: {old} -> {new}")
        self.states[node] = new
        self.since[node] = time.monotonic()
        log.warning("node %s: %s -> %s (%s)", node, old, new, why)
        for fn in self.listeners:
            fn(node, old, new)

    def update(self, node: str, any_link_up: bool, disk_alive: bool | None = None) -> None:
        """Re-judge one peer from its links and (later) its disk liveness slot."""
        if node == self.me:
            return
        if any_link_up:
            self._set_state(node, NodeState.UP, "a cluster network link is up")
        elif disk_alive:
            self._set_state(node, NodeState.ISOLATED, "no network answers, disk slot advances")
        else:
            self._set_state(node, NodeState.DOWN, "no heartbeat on any network")
