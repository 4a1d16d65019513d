"""The metadata service and node map caches, in-process on a real volume image.

Each "node" is a :class:`MapCache` whose ``call`` goes straight to the service's
``handle`` under its node name; its direct I/O is ``os.pwrite`` on the image file at the
LUN offsets its map gives. A recorder logs revocations, acknowledgements, node I/O and
every journal transaction, so tests assert the exact order of events.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.coordinator import messages
from shoal.coordinator.errors import (
    InvalidRequest,
    MapUnavailable,
    MetadataError,
    NotCoordinator,
    RevokeFailed,
)
from shoal.coordinator.maps import FileMap, MapCache
from shoal.coordinator.metadata import MetadataService, MetadataSettings
from shoal.volume import Volume, format_volume
from shoal.volume.errors import DeviceError, VolumeError, VolumeFull
from shoal.volume.fsck import fsck

KiB = 1 << 10
U = 64 * KiB


class Cluster:
    """One coordinator's service plus one MapCache per node, with an event recorder."""

    def __init__(self, path: str, nodes: tuple[str, ...] = ("n1", "n2", "n3"), *,
                 revoke_timeout_s: float = 5.0, guard: Callable[[], None] | None = None):
        self.path = path
        self.events: list[str] = []
        self.unresponsive: list[str] = []
        self.hang: set[str] = set()
        self.vol = Volume.open(path, offline=False, guard=guard)
        log = self.vol._log

        def recording_log(batch: list[Any], **kw: Any) -> int:
            self.events.append("log " + ",".join(type(op).__name__ for op in batch))
            return log(batch, **kw)

        self.vol._log = recording_log  # type: ignore[method-assign]
        self.service = MetadataService(
            self.vol, revoke=self._revoke, on_unresponsive=self.unresponsive.append,
            settings=MetadataSettings(revoke_timeout_s=revoke_timeout_s),
        )
        self.nodes = {n: MapCache(functools.partial(self.service.handle, n)) for n in nodes}
        self.fd = os.open(path, os.O_RDWR)

    async def _revoke(self, node: str, ino: int, version: int) -> None:
        self.events.append(f"revoke {node}")
        if node in self.hang:
            await asyncio.Event().wait()
        await self.nodes[node].revoke(ino, version)
        self.events.append(f"acked {node}")

    def close(self) -> None:
        os.close(self.fd)
        self.service.close()
        self.vol.close()

    async def write(self, node: str, ino: int, offset: int, data: bytes) -> None:
        """A node's direct write: allocate holes through the coordinator, then pwrite."""
        cache = self.nodes[node]
        for _ in range(100):
            await cache.ensure_allocated(ino, offset, len(data))
            try:
                with cache.using(ino) as m:
                    segs = m.segments(offset, len(data))
                    if any(lun is None for _, lun, _ in segs):
                        continue
                    for s, lun, n in segs:
                        assert lun is not None
                        os.pwrite(self.fd, data[s - offset : s - offset + n], lun)
                    return
            except MapUnavailable:
                continue
        raise AssertionError("the write never got a complete map")

    def read_by_coordinator(self, path: str, offset: int, length: int) -> bytes:
        return self.vol.open_file(path).pread(offset, length)

    def transactions(self) -> list[str]:
        return [e for e in self.events if e.startswith("log ")]


def run(coro_fn: Callable[[Cluster], Awaitable[None]], path: str, **kw: Any) -> Cluster:
    cluster = Cluster(path, **kw)
    try:
        asyncio.run(asyncio.wait_for(coro_fn(cluster), 20))
    finally:
        cluster.close()
    return cluster


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = str(tmp_path / "csv.img")
    format_volume(path, 64 << 20, unit_size=U, name="csv")
    return path


def assert_fsck_clean(path: str) -> None:
    report = fsck(path)
    assert report.error is None and not report.problems, (report.error, report.problems)


# ---- data path --------------------------------------------------------------------------


def test_direct_writes_through_maps_read_back_by_coordinator(image: str) -> None:
    a = os.urandom(3 * U + 1234)
    b = os.urandom(5000)

    async def scenario(c: Cluster) -> None:
        await c.nodes["n1"].create("/vm.img", 16 * U)
        ino = (await c.nodes["n1"].open("/vm.img")).ino
        await c.nodes["n2"].open("/vm.img")
        await c.write("n1", ino, U // 2, a)
        await c.write("n2", ino, 10 * U - 100, b)
        got = await asyncio.to_thread(c.read_by_coordinator, "/vm.img", 0, 16 * U)
        expect = bytearray(16 * U)
        expect[U // 2 : U // 2 + len(a)] = a
        expect[10 * U - 100 : 10 * U - 100 + len(b)] = b
        assert got == bytes(expect)
        st = await c.nodes["n2"].stat("/vm.img")
        assert st["allocated"] == (4 + 2) * U  # units 0-3 and 9-10; the rest are holes
        assert c.transactions() == ["log Create,SetSize", "log Map", "log Map"]

    run(scenario, image)
    assert_fsck_clean(image)


def test_concurrent_allocation_of_one_hole_maps_it_once(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        await c.nodes["n1"].create("/f", 8 * U)
        ino = (await c.nodes["n1"].open("/f")).ino
        for n in ("n2", "n3"):
            await c.nodes[n].open("/f")
        for offset, length in ((0, U), (U + 5, 2 * U), (5 * U, 3 * U)):
            maps = await asyncio.gather(*(c.nodes[n].ensure_allocated(ino, offset, length) for n in c.nodes))
            segs = {tuple(m.segments(offset, length)) for m in maps}
            assert len(segs) == 1, "two nodes got different units for the same bytes"
        st = await c.nodes["n1"].stat("/f")
        assert st["allocated"] == 7 * U  # units 0-3 and 5-7
        assert len([t for t in c.transactions() if t.startswith("log Map")]) == 3

    run(scenario, image)
    assert_fsck_clean(image)


def test_a_hole_allocated_by_another_node_refreshes_the_map(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        await c.nodes["n1"].create("/f", 4 * U)
        old = await c.nodes["n1"].open("/f")
        await c.nodes["n2"].open("/f")
        new2 = await c.nodes["n2"].ensure_allocated(old.ino, U, 10)
        assert c.nodes["n1"].lookup(old.ino, U, 10) == [(U, None, 10)]  # n1's map is older
        new1 = await c.nodes["n1"].ensure_allocated(old.ino, U, 10)
        assert new1.version == new2.version > old.version
        assert new1.segments(U, 10) == new2.segments(U, 10)
        assert c.transactions().count("log Map") == 1  # n1's request allocated nothing
        # a read through a stale map confirms the hole with the coordinator first
        await c.write("n2", old.ino, 2 * U, b"data")
        stale = c.nodes["n1"].lookup(old.ino, 2 * U, 4)
        assert stale == [(2 * U, None, 4)]
        ((_, lun, _),) = await c.nodes["n1"].resolve(old.ino, 2 * U, 4)
        assert lun is not None and os.pread(c.fd, 4, lun) == b"data"

    run(scenario, image)


# ---- revocation -------------------------------------------------------------------------


async def _two_holders(c: Cluster, path: str = "/f") -> int:
    await c.nodes["n1"].create(path, 8 * U)
    ino = (await c.nodes["n1"].open(path)).ino
    await c.nodes["n2"].open(path)
    await c.write("n1", ino, 0, os.urandom(8 * U))
    await c.nodes["n2"].refresh(ino)
    c.events.clear()
    return ino


def test_shrink_revokes_the_other_holder_before_freeing(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        v_before = c.nodes["n2"].lookup(ino, 0, 1)
        m = await c.nodes["n1"].resize(ino, 2 * U)
        # n3 never opened the file, and n1 asked: only n2 is revoked, before the free
        assert c.events == ["revoke n2", "acked n2", "log SetSize"]
        assert m.size == 2 * U and m.extents[-1][0] + m.extents[-1][2] == 2 * U
        with pytest.raises(MapUnavailable):
            c.nodes["n2"].lookup(ino, 0, 1)
        fresh = await c.nodes["n2"].refresh(ino)
        assert fresh.version == m.version and fresh.segments(0, 1) == v_before

    run(scenario, image)
    assert_fsck_clean(image)


def test_remove_revokes_the_other_holder_before_freeing(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        await c.nodes["n1"].remove("/f")
        assert c.events == ["revoke n2", "acked n2", "log Remove"]
        assert c.nodes["n2"].cached(ino) is None
        with pytest.raises(MetadataError) as err:
            await c.nodes["n2"].refresh(ino)
        assert err.value.code == "not-found"
        assert c.service.holders.get(ino) is None

    run(scenario, image)
    assert_fsck_clean(image)


def test_trim_revokes_first_and_a_trim_that_frees_nothing_revokes_nobody(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        await c.nodes["n1"].trim(ino, 100, U)  # no whole unit inside: nothing to free
        assert c.events == []
        await c.nodes["n2"].refresh(ino)
        c.events.clear()
        m = await c.nodes["n1"].trim(ino, U - 1, 3 * U)  # whole units 1 and 2
        assert c.events == ["revoke n2", "acked n2", "log Unmap"]
        assert m.holes(0, 8 * U) == [(U, 2 * U)]

    run(scenario, image)
    assert_fsck_clean(image)


def test_revoke_waits_for_in_flight_io_through_the_old_map(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        started = threading.Event()

        def slow_io() -> None:
            with c.nodes["n2"].using(ino) as m:
                c.events.append("io start n2")
                started.set()
                time.sleep(0.4)
                for _, lun, n in m.segments(3 * U, 10):
                    assert lun is not None
                    os.pwrite(c.fd, b"x" * n, lun)
                c.events.append("io end n2")

        io = asyncio.get_running_loop().run_in_executor(None, slow_io)
        await asyncio.to_thread(started.wait, 5)
        await c.nodes["n1"].trim(ino, 2 * U, 2 * U)
        await io
        assert c.events == ["io start n2", "revoke n2", "io end n2", "acked n2", "log Unmap"]

    run(scenario, image)
    assert_fsck_clean(image)


def test_an_unresponsive_holder_fails_the_free_and_nothing_is_freed(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        await c.nodes["n3"].open("/f")
        c.hang.add("n2")
        before = (await c.nodes["n1"].stat("/f"))["allocated"]
        with pytest.raises(MetadataError) as err:
            await c.nodes["n1"].resize(ino, U)
        assert err.value.code == "in-use"
        assert "n2 did not give up its map" in str(err.value) and "nothing was freed" in str(err.value)
        assert c.unresponsive == ["n2"]
        assert c.transactions() == []
        assert (await c.nodes["n1"].stat("/f"))["size"] == 8 * U
        assert (await c.nodes["n1"].stat("/f"))["allocated"] == before
        assert set(c.service.holders[ino]) == {"n2"}  # n3 acknowledged; n2 still holds its map
        # the agent fences n2 and forgets its maps; then the free goes through
        c.service.forget_node("n2")
        c.events.clear()
        await c.nodes["n1"].resize(ino, U)
        assert c.transactions() == ["log SetSize"]

    run(scenario, image, revoke_timeout_s=0.3)
    assert_fsck_clean(image)


def test_with_an_unresponsive_holder_trim_frees_nothing_and_zero_writes_zeros_in_place(image: str) -> None:
    """A client's TRIM and WRITE_ZEROES do not fail because another node went silent:
    the trim, a hint, frees nothing; the zeroing writes zeros into the mapped units, so
    the silent node's map stays true."""
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        c.hang.add("n2")
        stale = c.nodes["n2"].lookup(ino, 0, 8 * U)
        before = (await c.nodes["n1"].stat("/f"))["allocated"]
        content = c.read_by_coordinator("/f", 0, 8 * U)
        await c.nodes["n1"].trim(ino, 0, 4 * U)
        assert c.unresponsive == ["n2"] and c.transactions() == []
        assert (await c.nodes["n1"].stat("/f"))["allocated"] == before
        m = await c.nodes["n1"].zero(ino, U - 7, 2 * U)
        assert c.unresponsive == ["n2", "n2"] and c.transactions() == []
        assert (await c.nodes["n1"].stat("/f"))["allocated"] == before
        assert m.segments(0, 8 * U) == stale  # nothing moved: the silent node's map is still true
        units = [(lun, n) for _, lun, n in stale if lun is not None]
        assert len(units) == len(stale)
        # the range reads as zeros, through the silent node's map too; nothing else changed
        want = content[: U - 7] + bytes(2 * U) + content[3 * U - 7 :]
        assert c.read_by_coordinator("/f", 0, 8 * U) == want
        assert b"".join(os.pread(c.fd, n, lun) for lun, n in units) == want

    run(scenario, image, revoke_timeout_s=0.3)
    assert_fsck_clean(image)


def test_a_map_older_than_an_acknowledged_revocation_is_refused(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        crossed = await c.service.handle("n2", "map", {"ino": ino})  # in flight during the free
        await c.nodes["n1"].resize(ino, U)
        with pytest.raises(MapUnavailable, match="older than a revocation"):
            c.nodes["n2"].install(crossed)
        fresh = await c.nodes["n2"].refresh(ino)
        assert fresh.version > crossed["map_version"] and fresh.size == U
        # and a late revocation to an older version does not drop a newer map
        await c.nodes["n2"].revoke(ino, crossed["map_version"])
        assert c.nodes["n2"].cached(ino) == fresh

    run(scenario, image)


# ---- errors -----------------------------------------------------------------------------


def test_refusals_carry_stable_error_codes(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        h = functools.partial(c.service.handle, "n1")
        await h("mkdir", {"path": "/d"})
        await h("create", {"path": "/d/f", "size": U})
        ino = (await h("open", {"path": "/d/f"}))["ino"]
        cases = [
            (("open", {"path": "/nope"}), "not-found"),
            (("create", {"path": "/d/f"}), "exists"),
            (("mkdir", {"path": "/d/f/x"}), "not-a-directory"),
            (("open", {"path": "/d"}), "is-a-directory"),
            (("remove", {"path": "/d"}), "not-empty"),
            (("mkdir", {"path": "/d/.."}), "invalid-name"),
            (("create", {"path": "/big", "size": 1 << 30, "preallocate": True}), "full"),
            (("allocate", {"ino": ino, "offset": U, "length": 1}), "invalid-argument"),
            (("allocate", {"ino": ino, "offset": -1, "length": 1}), "invalid-argument"),
            (("resize", {"ino": ino}), "invalid-argument"),
            (("frobnicate", {}), "invalid-argument"),
            (("open", {"path": 7}), "invalid-argument"),
            (("open", {"path": "/d/f", "extra": 1}), "invalid-argument"),
        ]
        for (op, args), code in cases:
            result = await h(op, args)
            assert result.get("error") == code, (op, args, result)
            assert isinstance(result["message"], str) and result["message"]
        with pytest.raises(MetadataError) as err:
            await c.nodes["n2"].open("/nope")
        assert err.value.code == "not-found" and "/nope does not exist" in str(err.value)

    run(scenario, image)


def test_a_deposed_coordinator_answers_not_coordinator(image: str) -> None:
    deposed = threading.Event()

    def guard() -> None:
        if deposed.is_set():
            raise NotCoordinator("this node is not the coordinator of the volume")

    async def scenario(c: Cluster) -> None:
        deposed.set()
        result = await c.service.handle("n1", "create", {"path": "/f", "size": 0})
        assert result == {"error": "not-coordinator", "message": "this node is not the coordinator of the volume"}

    cluster = Cluster(image, guard=guard)
    try:
        asyncio.run(scenario(cluster))
    finally:
        os.close(cluster.fd)
        cluster.service.close()
        deposed.clear()
        try:
            cluster.vol.close()
        except VolumeError:
            pass  # the journal saw the guard refuse; reopening replays it


def test_the_error_table_is_complete_and_ordered() -> None:
    assert messages.error_code(VolumeFull("x")) == "full"
    assert messages.error_code(DeviceError("x")) == "io-error"
    assert messages.error_code(VolumeError("x")) == "io-error"
    assert messages.error_code(RevokeFailed("x", nodes=["n2"])) == "in-use"
    assert messages.error_code(InvalidRequest("x")) == "invalid-argument"
    assert messages.error_code(KeyError("bug")) is None
    codes = {code for _, code in messages.ERROR_CODES}
    assert {"not-found", "exists", "not-a-directory", "is-a-directory", "not-empty", "invalid-name",
            "full", "in-use", "not-coordinator", "io-error"} <= codes
    # a subclass listed after its base would never be reached
    classes = [cls for cls, _ in messages.ERROR_CODES]
    for i, cls in enumerate(classes):
        assert not any(issubclass(cls, base) for base in classes[:i]), cls


def test_file_map_segments_cover_the_range_with_holes() -> None:
    m = FileMap(ino=5, size=10 * U, unit_size=U, version=1,
                extents=((0, 1000 * U, 2 * U), (4 * U, 50 * U, U)))
    assert m.segments(U + 10, 4 * U) == [
        (U + 10, 1001 * U + 10, U - 10), (2 * U, None, 2 * U), (4 * U, 50 * U, U), (5 * U, None, 10)]
    assert m.segments(9 * U, U) == [(9 * U, None, U)]
    assert m.holes(0, 2 * U) == []
    with pytest.raises(MetadataError):
        FileMap.decode({"ino": 1, "size": 0, "unit_size": U, "map_version": 1, "extents": [[0, 0, U], [10, 0, U]]})


def test_a_cancelled_free_frees_nothing_and_releases_the_file(image: str) -> None:
    async def scenario(c: Cluster) -> None:
        ino = await _two_holders(c)
        c.hang.add("n2")
        task = asyncio.create_task(c.service.handle("n1", "trim", {"ino": ino, "offset": 0, "length": 8 * U}))
        while "revoke n2" not in c.events:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c.transactions() == [] and c.unresponsive == []
        m = await asyncio.wait_for(c.nodes["n3"].open("/f"), 2)  # the file's lock was released
        assert m.holes(0, 8 * U) == []

    run(scenario, image)
    assert_fsck_clean(image)
