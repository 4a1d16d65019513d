"""Where a VM goes: pure choices the agent and the coordinator act on.

``choose_node`` keeps one rule for failover, drain and ``vm start`` without ``--on``:
the first of the VM's preferred owners that can take it, else the node that runs the
fewest VMs (ties by name, so every node computing it gets the same answer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def choose_node(preferred: Iterable[str], candidates: Iterable[str], load: Mapping[str, int]) -> str | None:
    """The node a VM should run on, or None when no candidate exists.

    ``candidates`` are the nodes that may take a VM now (up, not paused, not the one
    it is leaving); ``load`` counts the VMs each node owns."""
    pool = sorted(set(candidates))
    if not pool:
        return None
    for node in preferred:
        if node in pool:
            return node
    return min(pool, key=lambda n: (load.get(n, 0), n))
