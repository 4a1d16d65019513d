"""Our asyncio client against our server: commands, errors, timeouts, abort, reconnect."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import pytest

from shoal.nbd.backend import FileBackend
from shoal.nbd.client import ClientSettings, NBDClient
from shoal.nbd.constants import EINVAL, ENOSPC, Cmd
from shoal.nbd.errors import (
    ConnectionAborted,
    HandshakeRefused,
    NBDCommandError,
    NBDConnectionError,
    RequestTimeout,
)
from tests.integration.nbd_helpers import BackgroundServer, serving, short_dir

MiB = 1 << 20


class GatedBackend(FileBackend):
    """Writes wait for ``gate``; every write that reaches the file is recorded."""

    inline_max = 0

    def __init__(self, path: str):
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.landed: list[int] = []

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        self.entered.release()
        self.gate.wait(30)
        super().write(offset, data, fua)
        self.landed.append(offset)


@pytest.fixture
def gated() -> Iterator[tuple[BackgroundServer, GatedBackend]]:
    with short_dir() as d:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
        backend = GatedBackend(image)
        with serving({"disk": backend}, os.path.join(d, "s"), tcp=True) as srv:
            yield srv, backend
            backend.gate.set()
        backend.close()


def run(coro: object, timeout: float = 30) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def test_commands_and_errors(gated: tuple[BackgroundServer, GatedBackend]) -> None:
    srv, backend = gated
    backend.gate.set()

    async def scenario() -> None:
        async with await NBDClient.connect(("127.0.0.1", srv.port), "disk", allocation=True) as c:
            await c.write(MiB, b"abc" * 1000, fua=True)
            assert await c.read(MiB, 3000) == b"abc" * 1000
            reads = await asyncio.gather(*(c.read(MiB + i, 1) for i in range(100)))  # pipelined
            assert b"".join(reads) == (b"abc" * 1000)[:100]
            with pytest.raises(NBDCommandError) as err:
                await c.read(16 * MiB - 1, 2)
            assert err.value.errno == EINVAL and "past the end" in str(err.value)
            with pytest.raises(NBDCommandError) as err:
                await c.write(16 * MiB, b"x")
            assert err.value.errno == ENOSPC
            with pytest.raises(NBDCommandError):
                await c.raw_request(Cmd.CACHE, 0, 0, 512)
            assert await c.read(MiB, 3) == b"abc"  # the connection survived all of it
            big = os.urandom(16 * MiB)  # the receive buffer grows to hold it
            await c.write(0, big[: 16 * MiB])
            await asyncio.gather(c.write(8 * MiB, big[: 8 * MiB]), c.write(0, big[8 * MiB : 16 * MiB]))
            assert await c.read(0, 16 * MiB) == big[8 * MiB : 16 * MiB] + big[: 8 * MiB]

    run(scenario())


def test_connect_errors_are_sentences(gated: tuple[BackgroundServer, GatedBackend]) -> None:
    srv, _ = gated
    with pytest.raises(HandshakeRefused, match="no export named 'other'"):
        run(NBDClient.connect(srv.sock, "other"))
    with pytest.raises(NBDConnectionError, match="cannot connect"):
        run(NBDClient.connect(srv.sock + ".missing", "disk"))


def test_abort_discards_queued_requests_so_they_never_land(
    gated: tuple[BackgroundServer, GatedBackend],
) -> None:
    srv, backend = gated

    async def scenario() -> None:
        c = await NBDClient.connect(srv.sock, "disk", ClientSettings(max_in_flight=3))
        tasks = [asyncio.create_task(c.write(i * MiB, bytes([i]) * 4096)) for i in range(10)]
        for _ in range(3):  # three writes reached the backend and are stuck there
            await asyncio.to_thread(backend.entered.acquire, True, 10)
        report = c.abort("storage path failed")
        assert report == {"discarded": 7, "in_flight": 3}
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ConnectionAborted) for r in results), results
        backend.gate.set()
        await asyncio.sleep(0.5)  # give a stale write every chance to land
        with pytest.raises(NBDConnectionError):
            await c.read(0, 512)

    run(scenario())
    # only the three that had reached the server may land; the queued seven never do
    assert len(backend.landed) <= 3
    assert set(backend.landed) <= {0, MiB, 2 * MiB}


def test_timeout_aborts_then_reconnect(gated: tuple[BackgroundServer, GatedBackend]) -> None:
    srv, backend = gated

    async def scenario() -> None:
        settings = ClientSettings(request_timeout_s=0.3, reconnect_delay_s=0.05)
        c = await NBDClient.connect(srv.sock, "disk", settings)
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="aborted"):
            await c.write(0, b"late")
        assert time.monotonic() - started < 5
        assert not c.connected
        backend.gate.set()
        await c.reconnect()
        await c.write(4096, b"on time")
        assert await c.read(4096, 7) == b"on time"
        await c.close()

    run(scenario())


def test_reconnect_after_server_restart() -> None:
    with short_dir() as d:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(MiB)
        sock = os.path.join(d, "s")
        backend = FileBackend(image)

        async def scenario() -> None:
            settings = ClientSettings(
                reconnect_attempts=6, reconnect_delay_s=0.05, reconnect_max_delay_s=0.2
            )
            with serving({"disk": backend}, sock):
                c = await NBDClient.connect(sock, "disk", settings)
                await c.write(0, b"before")
            with pytest.raises(NBDConnectionError):
                await c.read(0, 6)
            with serving({"disk": backend}, sock):
                await c.reconnect()
                assert await c.read(0, 6) == b"before"
                await c.close()
            with pytest.raises(NBDConnectionError, match="cannot reconnect"):
                await c.reconnect()

        run(scenario(), 60)
        backend.close()


def test_a_cancelled_request_does_not_break_the_connection(gated: tuple[BackgroundServer, GatedBackend]) -> None:
    srv, backend = gated

    async def scenario() -> None:
        async with await NBDClient.connect(srv.sock, "disk") as c:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # the caller gives up; the write is still queued
                    await c.write(0, b"slow")
            backend.gate.set()
            await c.write(8192, b"next")  # the late reply to the abandoned write is ignored
            assert await c.read(8192, 4) == b"next"
            assert c.connected

    run(scenario())


def test_a_request_during_close_is_refused_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """close() waits for requests in flight; one submitted meanwhile fails at once
    instead of going out on a link about to close and timing out unanswered."""
    import time as _time

    from shoal.nbd.backend import Backend
    from shoal.nbd.client import ClientSettings, NBDClient
    from shoal.nbd.errors import NBDError
    from shoal.nbd.server import NBDServer

    class SlowFlush(Backend):
        size = 1 << 20

        def read_into(self, offset, buf):  # type: ignore[no-untyped-def]
            buf[:] = bytes(len(buf))

        def write(self, offset, data, fua=False):  # type: ignore[no-untyped-def]
            pass

        def write_zeroes(self, *a, **k):  # type: ignore[no-untyped-def]
            pass

        def trim(self, *a, **k):  # type: ignore[no-untyped-def]
            pass

        def flush(self) -> None:
            _time.sleep(0.5)

    async def main() -> float:
        sock = str(tmp_path / "c.sock")
        srv = NBDServer({"": SlowFlush()}, threads=2)
        await srv.listen_unix(sock)
        c = await NBDClient.connect(sock, "", ClientSettings(request_timeout_s=5))
        first = asyncio.create_task(c.flush())
        await asyncio.sleep(0.05)
        closer = asyncio.create_task(c.close())
        await asyncio.sleep(0.05)
        t = _time.monotonic()
        with pytest.raises(NBDError):
            await c.flush()
        took = _time.monotonic() - t
        await closer
        await first
        await srv.close()
        return took

    assert asyncio.run(main()) < 1.0


def test_start_read_sends_from_a_callback_and_answers_through_then(
        gated: tuple[BackgroundServer, GatedBackend]) -> None:
    srv, backend = gated
    backend.gate.set()  # writes pass

    async def scenario() -> None:
        c = await NBDClient.connect(srv.sock, "disk", ClientSettings(max_in_flight=2))
        await c.write(0, b"a" * 4096 + b"b" * 4096)
        got: list[tuple[object, object]] = []
        both = asyncio.Event()

        def then(data: object, err: object) -> None:
            got.append((bytes(data) if isinstance(data, bytearray) else data, err))
            if len(got) == 2:
                both.set()

        assert c.start_read(0, 4096, then) and c.start_read(4096, 4096, then)
        assert not c.start_read(8192, 4096, then), "a third read went out with max_in_flight=2"
        assert not got, "then() ran before the reply could have come"
        await asyncio.wait_for(both.wait(), 10)
        assert sorted(got) == [(b"a" * 4096, None), (b"b" * 4096, None)]
        # both slots are free again
        got.clear()
        both.clear()
        assert c.start_read(0, 4096, then) and c.start_read(0, 4096, then)
        await asyncio.wait_for(both.wait(), 10)

        # an abort: the error reaches then() after abort() has returned, not from inside it
        got.clear()
        both.clear()
        assert c.start_read(0, 4096, then) and c.start_read(4096, 4096, then)
        c.abort("test")
        assert not got
        await asyncio.wait_for(both.wait(), 10)
        assert all(data is None and isinstance(err, NBDConnectionError) for data, err in got), got
        assert not c.start_read(0, 4096, then), "a read went out on an aborted connection"

    run(scenario())


def test_a_failing_start_read_callback_does_not_break_the_connection(
        gated: tuple[BackgroundServer, GatedBackend], caplog: pytest.LogCaptureFixture) -> None:
    srv, backend = gated
    backend.gate.set()

    async def scenario() -> None:
        async with await NBDClient.connect(srv.sock, "disk") as c:
            called = asyncio.Event()

            def then(data: object, err: object) -> None:
                called.set()
                raise RuntimeError("a bug in the caller")

            assert c.start_read(0, 4096, then)
            await asyncio.wait_for(called.wait(), 10)
            await c.write(0, b"still here")
            assert await c.read(0, 10) == b"still here"

    run(scenario())
    assert any("callback of a read" in r.getMessage() for r in caplog.records)
