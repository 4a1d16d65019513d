"""Async backends and async export lookup, against real peers: qemu-io (QEMU's NBD
client), our client, and raw sockets where the bytes matter."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from shoal.nbd import wire
from shoal.nbd.backend import AnyBackend, AsyncBackend, ExportResolver, Extent, ReadDone
from shoal.nbd.client import ClientSettings, NBDClient, list_exports
from shoal.nbd.constants import IHAVEOPT, OPTION_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, Opt, Rep
from shoal.nbd.errors import (
    BackendError,
    HandshakeRefused,
    NBDCommandError,
    NBDConnectionError,
    NBDError,
)
from shoal.nbd.server import NBDServer
from tests.integration.nbd_helpers import (
    BackgroundServer,
    raw_connect,
    recv_exact,
    require,
    serving,
    short_dir,
)

MiB = 1 << 20
SIZE = 64 * MiB


class MemoryBackend(AsyncBackend):
    """An export in memory. Requests can be delayed or failed by offset, and can be
    held at a gate; what started and completed, in which order, is recorded."""

    def __init__(self, size: int = SIZE):
        self.data = bytearray(size)
        self.delays: dict[int, float] = {}
        self.errors: dict[int, int] = {}  # offset -> errno to fail with
        self.gate: asyncio.Event | None = None  # set: requests pass
        self.started: list[tuple[str, int]] = []
        self.completed: list[tuple[str, int]] = []
        self.cancelled = 0
        self.running = 0
        self.max_running = 0

    @property
    def size(self) -> int:
        return len(self.data)

    async def _io(self, what: str, offset: int) -> None:
        self.started.append((what, offset))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delays.get(offset, 0))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if offset in self.errors:
            code = self.errors[offset]
            raise BackendError(f"injected {errno.errorcode[code]} at {offset}", code)

    def _done(self, what: str, offset: int) -> None:
        self.completed.append((what, offset))

    async def read(self, offset: int, length: int) -> bytes:
        await self._io("read", offset)
        self._done("read", offset)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        assert isinstance(data, bytes)  # an immutable copy, never the receive buffer
        await self._io("write", offset)
        self.data[offset : offset + len(data)] = data
        self._done("write", offset)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        await self._io("zeroes", offset)
        self.data[offset : offset + length] = bytes(length)
        self._done("zeroes", offset)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._io("trim", offset)
        self.data[offset : offset + length] = bytes(length)
        self._done("trim", offset)

    async def flush(self) -> None:
        await self._io("flush", 0)
        self._done("flush", 0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._io("status", offset)
        half = length // 2
        return [(half, 0), (length - half, STATE_HOLE | STATE_ZERO)]


class Resolver(ExportResolver):
    """Exports by name, each lookup delayed; names in ``broken`` raise."""

    def __init__(self, exports: dict[str, AnyBackend], delay_s: float = 0.0):
        self.exports = exports
        self.delay_s = delay_s
        self.slow: set[str] = set()
        self.broken: set[str] = set()
        self.asked: list[str] = []
        self.names_fail = False

    async def resolve(self, name: str) -> AnyBackend | None:
        self.asked.append(name)
        if name in self.slow:
            await asyncio.sleep(self.delay_s)
        if name in self.broken:
            raise RuntimeError("coordinator unreachable")
        return self.exports.get(name)

    async def names(self) -> list[str]:
        if self.names_fail:
            raise RuntimeError("coordinator unreachable")
        return sorted(self.exports)


def qemu_io(uri: str, *commands: str) -> str:
    """qemu-io's output; the caller judges it (errors are part of some tests)."""
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def assert_clean(out: str) -> None:
    assert "fail" not in out.lower() and "error" not in out.lower(), out


@pytest.fixture
def memory() -> Iterator[tuple[BackgroundServer, MemoryBackend]]:
    backend = MemoryBackend()
    with short_dir() as d, serving({"mem": backend}, os.path.join(d, "s")) as srv:
        yield srv, backend


def on_loop(srv: BackgroundServer, coro: object) -> object:
    """Run a coroutine on the server's loop (where async backends live)."""
    return asyncio.run_coroutine_threadsafe(coro, srv.loop).result(30)  # type: ignore[arg-type]


def run(coro: object, timeout: float = 30) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


# --- async backends -----------------------------------------------------------------


def test_qemu_io_patterns_on_an_async_backend(
    memory: tuple[BackgroundServer, MemoryBackend],
) -> None:
    srv, backend = memory
    uri = srv.uri("mem")
    assert_clean(
        qemu_io(
            uri,
            "write -P 0xa5 0 1M",
            "write -P 0x11 5000 3000",
            "aio_write -P 0x22 10M 128k",
            "aio_write -P 0x33 20M 2M",
            "aio_flush",
            "write -z 1M 64k",
            "discard 30M 1M",
            "flush",
        )
    )
    assert backend.data[0:5000] == b"\xa5" * 5000
    assert backend.data[5000:8000] == b"\x11" * 3000
    assert backend.data[20 * MiB : 22 * MiB] == b"\x33" * (2 * MiB)
    assert ("flush", 0) in backend.completed and ("zeroes", MiB) in backend.completed
    out = qemu_io(
        uri,
        "read -P 0xa5 0 4096",
        "read -P 0x11 5000 3000",
        "read -P 0x22 10M 128k",
        "read -P 0x33 20M 2M",
        "read -P 0 1M 64k",
    )
    assert_clean(out)
    assert out.count("read ") == 5


def test_async_requests_overlap_and_complete_out_of_order(
    memory: tuple[BackgroundServer, MemoryBackend],
) -> None:
    srv, backend = memory
    backend.data[0:4096] = b"\x01" * 4096
    backend.data[MiB : MiB + 4096] = b"\x02" * 4096
    backend.data[2 * MiB : 2 * MiB + 4096] = b"\x03" * 4096
    backend.delays = {0: 0.5, MiB: 0.2}  # the first request finishes last
    out = qemu_io(
        srv.uri("mem"),
        "aio_read -P 1 0 4k",
        "aio_read -P 2 1M 4k",
        "aio_read -P 3 2M 4k",
        "aio_flush",
    )
    assert_clean(out)
    reads = [r for r in backend.started if r[0] == "read"]
    assert reads == [("read", 0), ("read", MiB), ("read", 2 * MiB)]
    assert [c for c in backend.completed if c[0] == "read"] == [
        ("read", 2 * MiB),
        ("read", MiB),
        ("read", 0),
    ]
    assert backend.max_running >= 3  # all three ran at once on one connection


def test_async_backend_errors_reach_the_client_as_their_errno(
    memory: tuple[BackgroundServer, MemoryBackend],
) -> None:
    srv, backend = memory
    backend.errors = {8 * MiB: errno.ENOSPC, 9 * MiB: errno.EIO}
    out = qemu_io(srv.uri("mem"), "write -P 1 8M 4k", "read 9M 4k", "write -P 7 0 4k")
    assert "write failed: No space left on device" in out, out
    assert "read failed: Input/output error" in out, out
    assert "wrote 4096/4096 bytes at offset 0" in out, out  # the connection went on
    assert backend.data[0:4096] == b"\x07" * 4096

    async def ours() -> None:
        async with await NBDClient.connect(srv.sock, "mem", allocation=True) as c:
            with pytest.raises(NBDCommandError) as err:
                await c.write(8 * MiB, b"x" * 512)
            assert err.value.errno == errno.ENOSPC and "injected ENOSPC" in str(err.value)
            assert await c.block_status(0, 8192) == [(4096, 0), (4096, STATE_HOLE | STATE_ZERO)]
            assert await c.read(0, 4) == b"\x07" * 4

    run(ours())


def test_a_short_read_from_an_async_backend_is_an_error_not_a_broken_stream() -> None:
    class Short(MemoryBackend):
        async def read(self, offset: int, length: int) -> bytes:
            return b"x" * (length - 1)

    with short_dir() as d, serving({"s": Short()}, os.path.join(d, "s")) as srv:

        async def check() -> None:
            async with await NBDClient.connect(srv.sock, "s") as c:
                with pytest.raises(NBDCommandError, match="3 bytes for a read of 4"):
                    await c.read(0, 4)
                await c.write(0, b"ok")  # the stream is intact

        run(check())


class NowBackend(MemoryBackend):
    """Reads start from the server's callback (``read_now``) and end ``delays`` later
    from the loop, or when the test calls them (``hold``); offsets in ``declined`` go
    to ``read()``; ``short`` ones return a byte too few."""

    def __init__(self) -> None:
        super().__init__()
        self.declined: set[int] = set()
        self.short: set[int] = set()
        self.now: list[int] = []
        self.hold = False
        self.held: list[Callable[[], None]] = []

    def read_now(self, offset: int, length: int, done: ReadDone) -> bool:
        if offset in self.declined:
            return False
        self.now.append(offset)

        def end() -> None:
            if offset in self.errors:
                done(None, BackendError("injected", self.errors[offset]))
            else:
                n = length - 1 if offset in self.short else length
                done(bytes(self.data[offset : offset + n]), None)

        if self.hold:
            self.held.append(end)
        else:
            asyncio.get_running_loop().call_later(self.delays.get(offset, 0), end)
        return True


def test_reads_started_from_the_servers_callback(caplog: pytest.LogCaptureFixture) -> None:
    backend = NowBackend()
    backend.data[0:4096] = b"\x01" * 4096
    backend.data[MiB : MiB + 8192] = b"\x02" * 8192
    backend.data[2 * MiB : 2 * MiB + 4096] = b"\x03" * 4096
    backend.delays = {0: 0.4, MiB: 0.2}  # the first read ends last
    backend.declined = {2 * MiB}
    backend.errors = {3 * MiB: errno.EIO}
    backend.short = {4 * MiB}
    with short_dir() as d, serving({"now": backend}, os.path.join(d, "s")) as srv:
        out = qemu_io(srv.uri("now"), "aio_read -P 1 0 4k", "aio_read -P 2 1M 8k",
                      "aio_read -P 3 2M 4k", "aio_flush", "read 3M 4k")
        assert "read failed: Input/output error" in out, out
        assert out.count("read 4096/4096") == 2 and "read 8192/8192" in out, out
        assert backend.now == [0, MiB, 3 * MiB]
        # the declined one went through read()
        assert [r for r in backend.started if r[0] == "read"] == [("read", 2 * MiB)]

        async def ours() -> None:
            async with await NBDClient.connect(srv.sock, "now") as c:
                with pytest.raises(NBDCommandError, match="4095 bytes for a read of 4096"):
                    await c.read(4 * MiB, 4096)
                assert await c.read(MiB, 4) == b"\x02" * 4  # the stream is intact

        run(ours())

        # the client vanishes while reads are out: they end later, with nobody to answer
        async def cut() -> None:
            backend.hold = True
            c = await NBDClient.connect(srv.sock, "now", ClientSettings(request_timeout_s=30))
            reads = [asyncio.create_task(c.read(i * 4096, 4096)) for i in range(4)]
            while len(backend.held) < 4:
                await asyncio.sleep(0.01)
            c.abort("test")
            results = await asyncio.gather(*reads, return_exceptions=True)
            assert all(isinstance(r, NBDConnectionError) for r in results), results
            await asyncio.sleep(0.1)
            for end in backend.held:
                srv.loop.call_soon_threadsafe(end)
            while srv.connections():  # the server let the connection go
                await asyncio.sleep(0.01)

        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            run(cut())
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not noise, noise


def test_back_pressure_bounds_async_work_per_connection(
    memory: tuple[BackgroundServer, MemoryBackend],
) -> None:
    """Requests beyond 128, or beyond 64 MiB of payload, stay unread in the socket."""
    srv, backend = memory
    on_loop(srv, _set_gate(backend))

    async def flood(count: int, length: int) -> None:
        settings = ClientSettings(max_in_flight=count, request_timeout_s=60)
        async with await NBDClient.connect(srv.sock, "mem", settings) as c:
            writes = [
                asyncio.create_task(c.write((i * length) % (SIZE - length), b"w" * length))
                for i in range(count)
            ]
            await asyncio.sleep(1.0)
            peak = backend.max_running
            srv.loop.call_soon_threadsafe(_open_gate, backend)
            await asyncio.gather(*writes)
            limit = 128 if length <= 4096 else 64
            assert peak <= limit, f"{peak} requests ran at once"
            assert peak >= limit // 2, f"only {peak} requests ran at once"

    run(flood(400, 4096), 60)
    backend.max_running = 0
    on_loop(srv, _set_gate(backend))
    run(flood(100, MiB), 60)
    assert len([c for c in backend.completed if c[0] == "write"]) == 500


async def _set_gate(backend: MemoryBackend) -> None:
    backend.gate = asyncio.Event()


def _open_gate(backend: MemoryBackend) -> None:
    assert backend.gate is not None
    backend.gate.set()


def test_server_close_cancels_running_tasks_and_sends_no_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend()

    async def main() -> None:
        backend.gate = asyncio.Event()  # never set: writes hang until cancelled
        with short_dir() as d:
            sock = os.path.join(d, "s")
            server = NBDServer({"mem": backend})
            await server.listen_unix(sock)
            c = await NBDClient.connect(sock, "mem", ClientSettings(request_timeout_s=30))
            writes = [asyncio.create_task(c.write(i * 4096, b"z" * 4096)) for i in range(5)]
            while backend.running < 5:
                await asyncio.sleep(0.01)
            t = time.monotonic()
            await server.close()
            assert time.monotonic() - t < 2
            assert backend.cancelled == 5 and backend.running == 0
            results = await asyncio.gather(*writes, return_exceptions=True)
            assert all(isinstance(r, NBDConnectionError) for r in results), results
            assert not backend.completed

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        asyncio.run(main())
    noise = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= 30]
    assert not noise, noise  # no "exception was never retrieved", no destroyed tasks


# --- async export lookup ----------------------------------------------------------------


@pytest.fixture
def resolved() -> Iterator[tuple[BackgroundServer, Resolver]]:
    resolver = Resolver({"fast": MemoryBackend(), "slow": MemoryBackend()}, delay_s=1.0)
    resolver.slow = {"slow"}
    resolver.broken = {"broken"}
    with short_dir() as d, serving(resolver, os.path.join(d, "s")) as srv:  # type: ignore[arg-type]
        yield srv, resolver


def test_slow_resolve_suspends_only_that_handshake(
    resolved: tuple[BackgroundServer, Resolver],
) -> None:
    srv, resolver = resolved

    async def scenario() -> None:
        slow = asyncio.create_task(
            asyncio.to_thread(qemu_io, srv.uri("slow"), "write -P 0x5c 0 64k", "read -P 0x5c 0 64k")
        )
        await asyncio.sleep(0.2)
        async with await NBDClient.connect(srv.sock, "fast") as c:  # served meanwhile
            await c.write(0, b"f" * 4096)
            assert await c.read(0, 4096) == b"f" * 4096
        assert not slow.done()  # the fast client was served while "slow" still waits
        waiting: list[bool] = []
        for _ in range(50):  # (between two of qemu's options nothing waits, briefly)
            waiting = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_handshakes_waiting(srv), srv.loop)
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting == [False]  # one handshake waits for its resolve, not reading
        out = await slow
        assert_clean(out)
        assert "read 65536/65536" in out

    run(scenario())
    slow_backend = resolver.exports["slow"]
    assert isinstance(slow_backend, MemoryBackend)
    assert slow_backend.data[:65536] == b"\x5c" * 65536


async def _handshakes_waiting(srv: BackgroundServer) -> list[bool]:
    """For each connection waiting for a handshake answer: is it still reading?"""
    assert srv.server is not None
    return [c._reading for c in srv.server._conns if c._asking is not None]


def test_failing_resolve_is_an_error_reply_and_the_connection_goes_on(
    resolved: tuple[BackgroundServer, Resolver], caplog: pytest.LogCaptureFixture
) -> None:
    srv, resolver = resolved
    with pytest.raises(HandshakeRefused) as err:
        run(NBDClient.connect(srv.sock, "broken"))
    assert err.value.reply_type == Rep.ERR_UNKNOWN
    assert "coordinator unreachable" in str(err.value)
    lines = [r.getMessage() for r in caplog.records if r.name == "shoal.nbd.server" and r.levelno >= 30]
    assert len(lines) == 1 and "'broken'" in lines[0] and "coordinator unreachable" in lines[0]

    # the same connection: GO on the broken name, then on a good one
    s = raw_connect(srv.sock)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(_option(Opt.GO, _go_data(b"broken")))
    opt, rep, message = _read_reply(s)
    assert (opt, rep) == (Opt.GO, Rep.ERR_UNKNOWN) and b"coordinator unreachable" in message
    s.sendall(_option(Opt.GO, _go_data(b"fast")))
    replies = []
    while not replies or replies[-1] != Rep.ACK:
        replies.append(_read_reply(s)[1])
    assert replies[-1] == Rep.ACK
    s.close()

    # LIST: names() failing is an error reply too; working, it lists
    resolver.names_fail = True
    with pytest.raises(HandshakeRefused, match="coordinator unreachable"):
        run(list_exports(srv.sock))
    resolver.names_fail = False
    assert run(list_exports(srv.sock)) == ["fast", "slow"]


def test_export_names_reach_the_resolver_as_sent(
    resolved: tuple[BackgroundServer, Resolver],
) -> None:
    srv, resolver = resolved
    with pytest.raises(HandshakeRefused, match="no export named"):
        run(NBDClient.connect(srv.sock, "//vm/./Disk é"))
    assert resolver.asked[-1] == "//vm/./Disk é"


def test_server_close_during_a_resolve_cancels_it() -> None:
    class Hanging(Resolver):
        cancelled = False

        async def resolve(self, name: str) -> AnyBackend | None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
            return None

    resolver = Hanging({})

    async def main() -> None:
        with short_dir() as d:
            sock = os.path.join(d, "s")
            server = NBDServer(resolver)
            await server.listen_unix(sock)
            connecting = asyncio.create_task(NBDClient.connect(sock, "any"))
            await asyncio.sleep(0.2)
            await asyncio.wait_for(server.close(), 5)
            assert resolver.cancelled
            with pytest.raises(NBDError, match="server closed the connection"):
                await connecting

    asyncio.run(main())


def _option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def _go_data(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def _read_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = wire.OPTION_REPLY.unpack(recv_exact(s, 20))
    assert magic == OPTION_REPLY_MAGIC
    return opt, rep, recv_exact(s, length)
