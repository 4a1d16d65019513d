"""NBDClient.read_piped: a large read's data spliced into a pipe, against our server and
qemu-nbd over TCP, on both event loops: the exact bytes every time; a reply in pieces
or with holes, and a pipe that fills up, come back in the buffer instead; a read cut
off mid-splice or abandoned by its caller leaks no pipe and leaves none dirty.
NBDClient.write_piped: a write's data spliced from a pipe to the socket lands exactly,
between other requests on the same connection (over a unix socket it is read out of
the pipe instead); one cut off mid-splice fails and leaves its pipe to the caller."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shoal.nbd.backend import FileBackend
from shoal.nbd.client import ClientSettings, NBDClient
from shoal.nbd.errors import ConnectionAborted
from shoal.util.pipes import F_SETPIPE_SZ, POOL, Piped, unread
from tests.integration.nbd_helpers import (
    BackgroundServer,
    make_sparse_image,
    require,
    serving,
    short_dir,
)
from tests.loops import LOOPS, LoopFactory, run
from tests.pipe_helpers import (
    Taken,
    assert_no_pipe_leaked,
    in_pipe,
    pool_is_clean,
    record_pipes,
    take_out,
)

MiB = 1 << 20
SIZE = 16 * MiB
@pytest.fixture
def pipes(monkeypatch: pytest.MonkeyPatch) -> list[Taken]:
    """Every pipe the pool hands out during the test."""
    return record_pipes(monkeypatch)


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[BackgroundServer, bytes]]:
    with short_dir() as d:
        image = os.path.join(d, "disk.raw")
        data = os.urandom(SIZE)
        with open(image, "wb") as f:
            f.write(data)
        backend = FileBackend(image)
        with serving({"disk": backend}, os.path.join(d, "s"), tcp=True) as srv:
            yield srv, data
        backend.close()


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[NBDClient]:
    c = await NBDClient.connect(("127.0.0.1", port), "disk", ClientSettings(request_timeout_s=20))
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_piped_reads_carry_the_exact_bytes(
    loop_factory: LoopFactory, target: tuple[BackgroundServer, bytes], pipes: list[Taken]
) -> None:
    srv, data = target

    async def main() -> None:
        async with client(srv.port) as c:
            cases = [(0, MiB), (4096, MiB), (3 * MiB + 17, 200_000), (5 * MiB, 128 * 1024), (0, 64 * 1024),
                     (SIZE - MiB, MiB)]
            for off, n in cases:
                result = await c.read_piped(off, n)
                assert not isinstance(result, Piped) or n >= 128 * 1024, "small reads are not worth a pipe"
                # the others are spliced, or come back in the buffer (should the system
                # give no pipe, or the pipe fill up): either way, the same bytes
                assert take_out(result) == data[off : off + n], (off, n)
            # many at once: replies interleave with splices
            results = await asyncio.gather(*(c.read_piped(i * MiB, MiB) for i in range(SIZE // MiB)))
            for i, result in enumerate(results):
                assert take_out(result) == data[i * MiB : (i + 1) * MiB], i
            assert c.spliced > 0
            # the connection goes on as usual
            assert await c.read(7, 100) == data[7:107]

    run(loop_factory, main(), timeout_s=60)
    assert pool_is_clean()
    assert pipes and len(POOL._free) <= POOL.keep
    assert_no_pipe_leaked(pipes)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_pipe_that_fills_up_gives_its_bytes_back_to_the_buffer(
    loop_factory: LoopFactory, target: tuple[BackgroundServer, bytes]
) -> None:
    srv, data = target

    async def main() -> None:
        # pipes of four pages: a MiB of data fills one long before it has all arrived
        small = []
        for _ in range(4):
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(w, F_SETPIPE_SZ, 16384)
            small.append((r, w))
        POOL.close()
        for fds in small:
            POOL.give(fds, emptied=True)
        async with client(srv.port) as c:
            results = await asyncio.gather(*(c.read_piped(i * MiB, MiB) for i in range(4)))
            for i, result in enumerate(results):
                assert isinstance(result, bytearray), "a full pipe hands the read back to its buffer"
                assert bytes(result) == data[i * MiB : (i + 1) * MiB], i
            assert c.splice_refills == 4 and c.spliced == 0
        POOL.close()  # the small pipes are not kept for other tests

    run(loop_factory, main(), timeout_s=60)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_holes_and_pieces_from_qemu_nbd_come_back_in_the_buffer(loop_factory: LoopFactory) -> None:
    qemu_nbd = require("qemu-nbd")
    with short_dir() as d:
        image = os.path.join(d, "q.raw")
        block = os.urandom(MiB)
        make_sparse_image(image, SIZE, {2 * MiB: block, 4 * MiB + 4096: block[:8192]})
        port = 10899
        proc = subprocess.Popen([qemu_nbd, "-f", "raw", "-t", "-x", "disk", "-b", "127.0.0.1", "-p", str(port), image])
        try:
            deadline = time.monotonic() + 20
            while subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout == "":
                assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.05)

            async def main() -> None:
                async with client(port) as c:
                    assert c.structured
                    whole = await c.read_piped(2 * MiB, MiB)  # all data: one chunk, spliced
                    assert take_out(whole) == block
                    # data, then a hole: two chunks, into the buffer
                    mixed = await c.read_piped(2 * MiB + MiB // 2, MiB)
                    assert isinstance(mixed, bytearray)
                    assert bytes(mixed) == block[MiB // 2 :] + bytes(MiB // 2)
                    holey = await c.read_piped(4 * MiB, MiB)  # hole, data, hole
                    assert bytes(holey) == bytes(4096) + block[:8192] + bytes(MiB - 4096 - 8192)
                    assert take_out(await c.read_piped(8 * MiB, MiB)) == bytes(MiB)  # all hole

            run(loop_factory, main())
        finally:
            proc.terminate()
            proc.wait(10)
    assert pool_is_clean()


class HoldingProxy:
    """TCP proxy to the server that passes the server's bytes until ``hold_after`` of
    them have gone through, then holds the rest until ``release``."""

    def __init__(self, port: int, hold_after: int):
        self.port = port
        self.hold_after = hold_after
        self.passed = 0
        self.released = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        # a small receive buffer (set before listening, so the window stays small): once
        # the proxy stops reading, the client's sends back up within a few KiB
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)

        async def up() -> None:
            while data := await r.read(65536):
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            while data := await ur.read(65536):
                if self.passed + len(data) > self.hold_after and not self.released.is_set():
                    cut = max(0, self.hold_after - self.passed)
                    w.write(data[:cut])
                    self.passed += cut
                    await self.released.wait()
                    data = data[cut:]
                w.write(data)
                self.passed += len(data)
                await w.drain()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(up(), down())
        w.close()
        uw.close()

    def close(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.close()


async def held_read(port: int, offset: int, data_bytes: int) -> tuple[HoldingProxy, NBDClient, asyncio.Future[Any]]:
    """A piped read of a MiB through a proxy that passes its reply header and the first
    ``data_bytes`` of its data, then holds the rest; returns once those have passed."""
    proxy = HoldingProxy(port, hold_after=1 << 40)
    c = await NBDClient.connect(("127.0.0.1", await proxy.start()), "disk", ClientSettings(request_timeout_s=20))
    proxy.hold_after = proxy.passed + 16 + data_bytes
    reading = asyncio.ensure_future(c.read_piped(offset, MiB))
    deadline = time.monotonic() + 10
    while proxy.passed < proxy.hold_after:
        assert time.monotonic() < deadline, "the proxy passed nothing"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # what came is spliced; the client waits for more
    return proxy, c, reading


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_read_cut_off_mid_splice_fails_and_its_pipe_is_closed(
    loop_factory: LoopFactory, target: tuple[BackgroundServer, bytes], pipes: list[Taken]
) -> None:
    srv, data = target

    async def main() -> None:
        proxy, c, reading = await held_read(srv.port, 0, 300_000)
        try:
            assert c._piped == 1 and c._link is not None and c._link._splicing is not None  # mid-splice
            c.abort("test")
            with pytest.raises(ConnectionAborted):
                await reading
        finally:
            proxy.close()

    run(loop_factory, main(), timeout_s=60)
    assert pool_is_clean()
    assert len(pipes) == 1 and (pipes[0][0], pipes[0][1]) not in POOL._free  # closed, not pooled
    assert_no_pipe_leaked(pipes)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_piped_read_whose_caller_left_is_dropped_and_the_connection_goes_on(
    loop_factory: LoopFactory, target: tuple[BackgroundServer, bytes], pipes: list[Taken]
) -> None:
    srv, data = target

    async def main() -> None:
        proxy, c, reading = await held_read(srv.port, MiB, 100_000)
        try:
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            proxy.released.set()
            # the abandoned reply is received and dropped; the next reads are right
            assert take_out(await c.read_piped(2 * MiB, MiB)) == data[2 * MiB : 3 * MiB]
            assert await c.read(5, 10) == data[5:15]
            assert c._piped == 0 and not c._pending
            await c.close()
        finally:
            proxy.close()

    run(loop_factory, main(), timeout_s=60)
    assert pool_is_clean()
    assert len(pipes) == 2
    assert_no_pipe_leaked(pipes)


# -- writes whose data waits in a pipe (NBDClient.write_piped) -------------------------


@pytest.fixture
def blank() -> Iterator[tuple[str, BackgroundServer, BackgroundServer]]:
    """A zeroed image served over TCP and over a unix socket: (image, tcp, unix)."""
    with short_dir() as d:
        image = os.path.join(d, "w.raw")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        backend = FileBackend(image)
        with serving({"disk": backend}, os.path.join(d, "t"), tcp=True) as tcp, \
                serving({"disk": backend}, os.path.join(d, "u")) as unix:
            yield image, tcp, unix
        backend.close()


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_piped_writes_land_exactly_between_other_requests(
    loop_factory: LoopFactory, blank: tuple[str, BackgroundServer, BackgroundServer],
    pipes: list[Taken],
) -> None:
    image, tcp, unix = blank
    expect = bytearray(SIZE)

    async def main() -> None:
        async with client(tcp.port) as c:
            for off, n in [(0, MiB), (3 * MiB + 17, 300_001), (SIZE - MiB, MiB), (5 * MiB, 128 * 1024)]:
                block = os.urandom(n)
                p = in_pipe(block)
                await c.write_piped(off, p)
                assert p._pool is None, "the client gives the emptied pipe back"
                expect[off : off + n] = block
                assert await c.read(off, n) == block, (off, n)
            # many at once, with small writes and reads between them on the same connection
            work = []
            for i in range(8):
                block, small = os.urandom(MiB), os.urandom(4096)
                expect[i * MiB : (i + 1) * MiB] = block
                expect[8 * MiB + i * 4096 : 8 * MiB + (i + 1) * 4096] = small
                work += [c.write_piped(i * MiB, in_pipe(block)), c.write(8 * MiB + i * 4096, small),
                         c.read(12 * MiB, 4096)]
            await asyncio.gather(*work)
            assert c.spliced_writes == 12
            await c.flush()
            assert await c.read(0, SIZE) == bytes(expect)
        # over a unix socket the data is read out of the pipe and written as usual
        c2 = await NBDClient.connect(unix.sock, "disk", ClientSettings(request_timeout_s=20))
        try:
            block = os.urandom(MiB)
            p = in_pipe(block)
            await c2.write_piped(2 * MiB, p)
            assert p._pool is None and c2.spliced_writes == 0
            expect[2 * MiB : 3 * MiB] = block
            assert await c2.read(2 * MiB, MiB) == block
        finally:
            await c2.close()

    run(loop_factory, main(), timeout_s=60)
    with open(image, "rb") as f:
        assert f.read() == bytes(expect)
    assert pool_is_clean()
    assert_no_pipe_leaked(pipes)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_piped_write_cut_off_mid_splice_fails_and_leaves_its_pipe_to_the_caller(
    loop_factory: LoopFactory, blank: tuple[str, BackgroundServer, BackgroundServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, tcp, _ = blank
    splice = os.splice
    moved = 0
    full_after = 100_000  # the socket "takes no more" after this much of the write's data

    def stalling(src: int, dst: int, count: int, *args: Any, **kw: Any) -> int:
        # (a real socket absorbs a MiB too readily, even with small buffers, to stop at
        # a point of our choosing)
        nonlocal moved
        if src == p.r:
            if moved >= full_after:
                raise BlockingIOError(11, "the socket is full")
            count = min(count, full_after - moved)
            n = splice(src, dst, count, *args, **kw)
            moved += n
            return n
        return splice(src, dst, count, *args, **kw)

    p = in_pipe(os.urandom(MiB))

    async def main() -> None:
        async with client(tcp.port) as c:
            monkeypatch.setattr(os, "splice", stalling)
            writing = asyncio.ensure_future(c.write_piped(0, p))
            deadline = time.monotonic() + 10
            while moved < full_after:
                assert time.monotonic() < deadline, "the write spliced nothing"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert not writing.done() and c._link is not None and c._link.write_lock.locked()  # mid-splice
            c.abort("test")
            with pytest.raises(ConnectionAborted):
                await writing
            monkeypatch.setattr(os, "splice", splice)
            assert p._pool is not None, "a write that failed leaves its pipe to the caller"
            assert unread(p.r) == MiB - full_after
            p.release(emptied=False)  # closed, never pooled with bytes in it

    run(loop_factory, main(), timeout_s=60)
    assert pool_is_clean()
