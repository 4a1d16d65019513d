"""A node's small reads on their fast path (``FileBackend.read_now``): a real storage
path (registered NBD connections to a real NBD server over TCP) under a file backend
whose map is cached, as in the agent. What must hold: the data is right and counted as
direct; the file's map stays held until the data is back (a revocation waits for it);
a path that fails under reads in flight takes the path down and the reads end through
the redirect, with the data still right; a redirected node's reads go to the
coordinator from the callback too, and one that goes wrong there is read again the
long way."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.coordinator.maps import MapCache
from shoal.datapath.backend import FileBackend as VolumeFileBackend
from shoal.datapath.errors import RedirectAgain
from shoal.datapath.lun import LunAddress, StoragePath
from shoal.datapath.router import BlockRouter, StartRead
from shoal.datapath.states import Counters
from shoal.nbd.backend import FileBackend, ReadDone
from tests.integration.nbd_helpers import BackgroundServer, serving, short_dir

MiB = 1 << 20
LUN_SIZE = 16 * MiB
INO = 7
#: the file's two extents: file [0, 2M) at LUN 4M, file [2M, 3M) at LUN 9M
EXTENTS = [[0, 4 * MiB, 2 * MiB], [2 * MiB, 9 * MiB, MiB]]
FILE_SIZE = 3 * MiB
IO_TIMEOUT_S = 0.5


def pattern(lun_offset: int, n: int) -> bytes:
    """Recognisable bytes for each 4 KiB block of the LUN."""
    return b"".join(f"lun block {b:08d} ".encode().ljust(4096, b".")
                    for b in range(lun_offset // 4096, (lun_offset + n) // 4096))


class GatedReads(FileBackend):
    """The LUN: reads wait while ``gate`` is clear (the server runs them in its pool)."""

    inline_max = 0

    def __init__(self, path: str):
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.gate.wait(30)
        super().read_into(offset, buf)


class Access:
    """The node's runtime of one volume, as the file backend sees it."""

    name = "vol1"

    def __init__(self, router: BlockRouter):
        self.router = router
        self.maps = MapCache(self._call)
        self.maps.install({"ino": INO, "size": FILE_SIZE, "unit_size": MiB, "map_version": 1,
                           "extents": EXTENTS})
        self.fenced = False

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError(f"no metadata request expected, got {op}")

    async def ready(self) -> None:
        assert not self.fenced

    def ready_now(self) -> bool:
        return not self.fenced

    def file_level(self) -> bool:
        return False

    async def file_io(self, kind: str, ino: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        raise AssertionError("no file-level request expected")


@pytest.fixture
def lun() -> Iterator[tuple[BackgroundServer, GatedReads, str]]:
    with short_dir() as d:
        image = os.path.join(d, "lun.img")
        with open(image, "wb") as f:
            f.write(pattern(0, LUN_SIZE))
        backend = GatedReads(image)
        with serving({"lun0": backend}, os.path.join(d, "s"), tcp=True) as srv:
            yield srv, backend, image
            backend.gate.set()
        backend.close()


class Node:
    """A storage path, a router whose redirect reads the LUN image itself (standing in
    for the coordinator), and the file backend of file INO."""

    def __init__(self, port: int, image: str, start_redirected_read: StartRead | None = None):
        self.image = image
        self.path = StoragePath(LunAddress("127.0.0.1", port, "lun0"), "node2", io_timeout_s=IO_TIMEOUT_S)
        self.counters = Counters()
        self.failures: list[str] = []
        self.redirected: list[tuple[str, int, int]] = []
        self.router = BlockRouter(self.path, redirect=self._redirect, direct_allowed=lambda: True,
                                  on_path_failed=self.failures.append, counters=self.counters,
                                  start_redirected_read=start_redirected_read)
        self.access = Access(self.router)
        self.file = VolumeFileBackend(self.access, INO, "/f.raw", FILE_SIZE)

    async def _redirect(self, kind: str, offset: int, length: int, payload: bytes) -> bytes:
        assert kind == "read"
        self.redirected.append((kind, offset, length))
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def read_now(self, offset: int, length: int) -> asyncio.Future[bytes]:
        """read_now's outcome as a future (None from read_now fails the test)."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def done(data: bytes | None, err: BaseException | None) -> None:
            assert not fut.done(), "done() was called twice"
            if err is not None:
                fut.set_exception(err)
            else:
                assert data is not None
                fut.set_result(bytes(data))

        assert self.file.read_now(offset, length, done), "read_now did not take a plain read"
        assert not fut.done(), "done() was called before read_now returned"
        return fut


def run(coro: object, timeout: float = 60) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def test_small_reads_go_direct_at_the_mapped_offsets(lun: tuple[BackgroundServer, GatedReads, str]) -> None:
    srv, _, image = lun

    async def main() -> None:
        node = Node(srv.port, image)
        await node.path.open(1)
        try:
            # one read in each extent, one at the very end of the file
            cases = [(0, 4096), (MiB + 8192, 4096), (2 * MiB, 65536), (FILE_SIZE - 4096, 4096)]
            got = await asyncio.gather(*(node.read_now(off, n) for off, n in cases))
            lun_of = {0: 4 * MiB, MiB + 8192: 5 * MiB + 8192, 2 * MiB: 9 * MiB, FILE_SIZE - 4096: 10 * MiB - 4096}
            for (off, n), data in zip(cases, got, strict=True):
                assert data == pattern(lun_of[off], n), f"file offset {off}"
            assert node.counters.direct_requests == len(cases)
            assert node.counters.direct_bytes == sum(n for _, n in cases)
            assert node.counters.redirected_requests == 0 and not node.redirected
            assert node.access.maps._state(INO).users == 0, "a map hold outlived its read"
        finally:
            await node.path.close()

    run(main())


def test_plain_reads_that_the_fast_path_does_not_take(lun: tuple[BackgroundServer, GatedReads, str]) -> None:
    srv, _, image = lun

    async def main() -> None:
        node = Node(srv.port, image)
        # the path is not open: nothing can go direct now
        assert not node.file.read_now(0, 4096, lambda d, e: None)
        await node.path.open(1)
        try:
            # across the two extents: two segments, read() does that
            assert not node.file.read_now(2 * MiB - 4096, 8192, lambda d, e: None)
            node.access.fenced = True
            assert not node.file.read_now(0, 4096, lambda d, e: None)
            assert node.access.maps._state(INO).users == 0
        finally:
            await node.path.close()

    run(main())


def test_a_revocation_waits_for_the_reads_in_flight(lun: tuple[BackgroundServer, GatedReads, str]) -> None:
    srv, backend, image = lun

    async def main() -> None:
        node = Node(srv.port, image)
        await node.path.open(1)
        try:
            backend.gate.clear()
            reads = [node.read_now(i * 4096, 4096) for i in range(8)]
            revoked = asyncio.ensure_future(node.access.maps.revoke(INO, 2))
            await asyncio.sleep(0.2)
            assert not revoked.done(), "the map was given up while reads using it were in flight"
            backend.gate.set()
            got = await asyncio.gather(*reads)
            await asyncio.wait_for(revoked, 10)
            assert got == [pattern(4 * MiB + i * 4096, 4096) for i in range(8)]
            # revoked: the next read cannot take the fast path on the old map
            assert not node.file.read_now(0, 4096, lambda d, e: None)
        finally:
            backend.gate.set()
            await node.path.close()

    run(main())


def test_a_path_that_fails_under_reads_redirects_them(lun: tuple[BackgroundServer, GatedReads, str]) -> None:
    srv, backend, image = lun

    async def main() -> None:
        node = Node(srv.port, image)
        await node.path.open(1)
        try:
            backend.gate.clear()  # the target stops answering: the I/O timeout fails the path
            offsets = [i * 12288 for i in range(20)]
            got = await asyncio.gather(*(node.read_now(off, 4096) for off in offsets))
            assert got == [pattern(4 * MiB + off, 4096) for off in offsets]
            assert not node.path.up
            # the owner hears of it (from each read that met it, as from read())
            assert node.failures and all("took longer than" in f for f in node.failures), node.failures
            assert sorted(off for _, off, _ in node.redirected) == [4 * MiB + off for off in offsets]
            assert node.counters.redirected_requests == len(offsets)
            assert node.counters.direct_requests == 0
            assert node.access.maps._state(INO).users == 0
        finally:
            backend.gate.set()
            await node.path.close()

    run(main())


def test_a_redirected_nodes_reads_start_from_the_callback_and_fall_back_the_long_way(
    lun: tuple[BackgroundServer, GatedReads, str],
) -> None:
    srv, _, image = lun
    started: list[int] = []
    refuse_at = {MiB}  # the coordinator "refuses" these (RedirectAgain)
    busy = False  # no lane free: nothing starts

    def start(offset: int, length: int, done: ReadDone) -> bool:
        if busy:
            return False
        started.append(offset)
        loop = asyncio.get_running_loop()
        if offset - 4 * MiB in refuse_at:
            loop.call_soon(done, None, RedirectAgain("refused"))
        else:
            loop.call_soon(done, pattern(offset, length), None)
        return True

    async def main() -> None:
        nonlocal busy
        node = Node(srv.port, image, start_redirected_read=start)
        # the path is not open: the node is redirected
        offsets = [0, 4096, MiB, MiB + 65536]
        got = await asyncio.gather(*(node.read_now(off, 65536) for off in offsets))
        assert got == [pattern(4 * MiB + off, 65536) for off in offsets]
        assert started == [4 * MiB + off for off in offsets], "every read started from the callback"
        # the refused one was read again the long way, once
        assert node.redirected == [("read", 5 * MiB, 65536)]
        assert node.counters.redirected_requests == len(offsets)
        assert node.counters.redirected_bytes == len(offsets) * 65536
        assert node.counters.direct_requests == 0
        assert node.access.maps._state(INO).users == 0, "a map hold outlived its read"
        busy = True
        assert not node.file.read_now(0, 4096, lambda d, e: None)
        assert node.access.maps._state(INO).users == 0

    run(main())
