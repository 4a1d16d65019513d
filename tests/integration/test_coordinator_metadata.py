"""The metadata service behind the real authenticated channel on 127.0.0.1.

The coordinator serves ``MetadataService.handle`` with a :class:`ChannelServer`; a node
talks to it with :class:`Connection.call` and serves ``revoke`` back on its own channel
server, so a revocation makes a real round trip. Measures the allocation RPC latency
(the goal is p50 <= 2 ms; printed, asserted only loosely so a slow CI box does not fail).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from shoal.coordinator.maps import MapCache
from shoal.coordinator.metadata import MetadataService, MetadataSettings
from shoal.netft.channel import ChannelServer, Connection
from shoal.volume import Volume, format_volume
from shoal.volume.fsck import fsck

KEY = b"test-secret-0123456789abcdef"
CLUSTER = "lab"
U = 64 << 10


def _port(server: ChannelServer) -> int:
    return int(server.servers["cluster"].sockets[0].getsockname()[1])


async def _scenario(path: str) -> dict[str, float]:
    vol = Volume.open(path, offline=False)
    events: list[str] = []
    to_nodes: dict[str, Connection] = {}

    async def revoke(node: str, ino: int, version: int) -> None:
        events.append(f"revoke {node}")
        await to_nodes[node].call("revoke", {"ino": ino, "version": version})
        events.append(f"acked {node}")

    service = MetadataService(vol, revoke=revoke, settings=MetadataSettings(revoke_timeout_s=5.0))

    async def coordinator_handler(peer: str, op: str, args: dict[str, Any], payload: bytes) -> tuple[Any, bytes]:
        return await service.handle(peer, op, args), b""

    coord = ChannelServer(CLUSTER, "n1", KEY, coordinator_handler)
    await coord.listen("cluster", "127.0.0.1", 0)
    caches: dict[str, MapCache] = {}
    servers = [coord]
    conns: list[Connection] = []
    try:
        for node in ("n2", "n3"):
            to_coord = await Connection.open(CLUSTER, node, KEY, "n1", "cluster", "127.0.0.1", _port(coord))
            conns.append(to_coord)

            async def call(op: str, args: dict[str, Any], conn: Connection = to_coord) -> Any:
                result, _ = await conn.call(op, args)
                return result

            cache = caches[node] = MapCache(call)

            async def node_handler(peer: str, op: str, args: dict[str, Any], payload: bytes,
                                   cache: MapCache = cache) -> tuple[Any, bytes]:
                assert op == "revoke" and peer == "n1"
                await cache.revoke(int(args["ino"]), int(args["version"]))
                return {}, b""

            srv = ChannelServer(CLUSTER, node, KEY, node_handler)
            await srv.listen("cluster", "127.0.0.1", 0)
            servers.append(srv)
            to_nodes[node] = await Connection.open(CLUSTER, "n1", KEY, node, "cluster", "127.0.0.1", _port(srv))
            conns.append(to_nodes[node])

        n2, n3 = caches["n2"], caches["n3"]
        await n2.create("/vm.img", 256 * U)
        ino = (await n2.open("/vm.img")).ino
        await n3.open("/vm.img")

        fd = os.open(path, os.O_RDWR)
        try:
            fresh, mapped = [], []
            for i in range(200):
                t = time.perf_counter()
                m = await n2.ensure_allocated(ino, i * U, 100)  # a new unit: zero, map, fsync
                fresh.append(time.perf_counter() - t)
                ((_, lun, _),) = m.segments(i * U, 100)
                assert lun is not None
                os.pwrite(fd, i.to_bytes(4, "big") * 25, lun)
                t = time.perf_counter()
                await n3.request("allocate", {"ino": ino, "offset": i * U, "length": 100})  # already mapped
                mapped.append(time.perf_counter() - t)
        finally:
            os.close(fd)

        f = vol.open_file("/vm.img")
        for i in (0, 77, 199):
            assert f.pread(i * U, 100) == i.to_bytes(4, "big") * 25
            assert f.pread(i * U + 100, U - 100) == bytes(U - 100), "an allocated unit was not zeroed"
        if service._refill is not None:
            await service._refill
        assert vol.meta.zeroed, "the service keeps no zeroed units ahead of allocation"
        with open(path, "rb") as lun:
            for unit in vol.meta.zeroed:
                lun.seek(vol.sb.unit_offset(unit))
                assert lun.read(U) == bytes(U), f"unit {unit} is in the zeroed pool but not zero"

        events.clear()
        await n2.resize(ino, 10 * U)  # n3 is revoked over the real channel first
        assert events == ["revoke n3", "acked n3"]
        assert n3.cached(ino) is None
        assert (await n3.refresh(ino)).size == 10 * U
        return {"fresh_p50_ms": statistics.median(fresh) * 1e3, "mapped_p50_ms": statistics.median(mapped) * 1e3}
    finally:
        for conn in conns:
            conn.close()
        for srv in servers:
            srv.close()
        service.close()
        vol.close()


def test_metadata_over_the_channel_with_revocation_and_latency(tmp_path: Path) -> None:
    path = str(tmp_path / "csv.img")
    format_volume(path, 64 << 20, unit_size=U, name="csv")
    figures = asyncio.run(asyncio.wait_for(_scenario(path), 25))
    print(
        f"allocation RPC p50: {figures['fresh_p50_ms']:.2f} ms for a new unit (zero + map + fsync), "
        f"{figures['mapped_p50_ms']:.2f} ms when already mapped (goal <= 2 ms)"
    )
    assert figures["mapped_p50_ms"] < 50 and figures["fresh_p50_ms"] < 200
    report = fsck(path)
    assert report.error is None and not report.problems, (report.error, report.problems)
