"""Which connection ("lane") a node's requests to the coordinator take.

A :class:`VolumeRuntime` on a fake agent whose ``call_peer`` runs one call at a time
per lane, as the real connection pool does (each pooled connection carries one call).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from shoal.agent.volumes import IO_LANES, LEASE_LANE, META_LANE, VolumeRuntime
from shoal.config.volumes import VolumeConfig


@dataclass
class LanedAgent:
    """The parts of NodeAgent a VolumeRuntime's calls to the coordinator use."""

    name: str = "node2"
    me: Any = field(default_factory=lambda: SimpleNamespace(id=2))
    cfg: Any = field(default_factory=lambda: SimpleNamespace(timing=SimpleNamespace(io_timeout_s=1.0),
                                                             run_dir="/nonexistent"))
    #: block calls wait here (the coordinator is slow with bulk data)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    lanes: dict[int, asyncio.Lock] = field(default_factory=dict)
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def call_peer(self, peer: str, op: str, args: dict[str, Any], payload: bytes = b"", *,
                        lane: int = 0) -> tuple[Any, bytes, str]:
        async with self.lanes.setdefault(lane, asyncio.Lock()):
            self.calls.append((op, str(args.get("kind", args.get("op"))), lane))
            if op == "csv.io" and args["length"] >= 1 << 20:
                await self.release.wait()
            return {}, bytes(args.get("length", 0)) if args.get("kind") == "read" else b"", "cluster"


def runtime(agent: LanedAgent) -> VolumeRuntime:
    rt = VolumeRuntime(agent, VolumeConfig("vol1", "nbd://198.18.4.250:10809/lun0"))  # type: ignore[arg-type]
    rt.coordinator, rt.coordinator_reachable = "node1", True
    return rt


def test_a_liveness_write_through_the_coordinator_does_not_wait_behind_block_io() -> None:
    async def scenario() -> None:
        agent = LanedAgent()
        rt = runtime(agent)
        try:
            # every block lane busy with a MiB the coordinator is slow to take, and more queued
            bulk = [asyncio.ensure_future(rt.router.write(i << 20, bytes(1 << 20))) for i in range(2 * IO_LANES)]
            await asyncio.sleep(0.05)
            busy = {lane for op, _, lane in agent.calls if op == "csv.io"}
            assert busy == set(range(1, IO_LANES + 1))
            assert rt._lane_calls == [2] * IO_LANES
            # the renewer's slot write (its router: the path is down, so through the coordinator)
            await asyncio.wait_for(rt.lease_router.write(4096, bytes(4096)), 5)
            assert agent.calls[-1] == ("csv.io", "write", LEASE_LANE)
            assert rt._lane_calls == [2] * IO_LANES  # its lane is not a block lane's
            # metadata keeps its own lane too
            await asyncio.wait_for(rt._meta_call("stat", {"path": "/f"}), 5)
            assert agent.calls[-1][2] == META_LANE
            agent.release.set()
            await asyncio.wait_for(asyncio.gather(*bulk), 5)
            assert rt._lane_calls == [0] * IO_LANES
        finally:
            rt.executor.shutdown(wait=False)
            rt.lease_executor.shutdown(wait=False)

    asyncio.run(scenario())
