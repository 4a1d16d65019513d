"""Fencing against a live server: REGISTER and PREEMPT (the NBD analogue of SCSI-3
persistent reservations), with writes in flight, with unregistered qemu-io beside
them, and against qemu-nbd, which does not know the options."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from shoal.nbd import wire
from shoal.nbd.backend import AsyncBackend, FileBackend
from shoal.nbd.client import ClientSettings, NBDClient, preempt
from shoal.nbd.constants import IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, Cmd, Opt, Rep
from shoal.nbd.errors import FencingUnsupported, NBDConnectionError, NBDFenced
from shoal.nbd.server import NBDServer
from tests.integration.nbd_helpers import (
    raw_connect,
    recv_exact,
    require,
    serving,
    short_dir,
)

MiB = 1 << 20
SIZE = 16 * MiB
FENCED_NODE2 = "holder node2 is fenced below key 2; register with a newer key"


class GatedFile(FileBackend):
    """Writes wait for ``gate`` in the pool thread; writes that reach the file are recorded."""

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


class GatedMemory(AsyncBackend):
    """An async backend whose writes wait for ``gate``; landed writes are recorded."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.gate = asyncio.Event()
        self.entered = 0
        self.landed: list[int] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.entered += 1
        await self.gate.wait()
        self.data[offset : offset + len(data)] = data
        self.landed.append(offset)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False
    ) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        pass

    async def flush(self) -> None:
        pass


def make_image(d: str) -> str:
    path = os.path.join(d, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def file_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@contextlib.asynccontextmanager
async def running(
    exports: dict[str, object], d: str, threads: int = 2
) -> AsyncIterator[tuple[NBDServer, str, tuple[str, int]]]:
    server = NBDServer(exports, threads=threads)  # type: ignore[arg-type]
    sock = os.path.join(d, "s")
    await server.listen_unix(sock)
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        yield server, sock, ("127.0.0.1", port)
    finally:
        await server.close()


async def qemu_io_async(uri: str, *commands: str) -> str:
    """qemu-io off the loop (the server under test runs on it)."""
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = await asyncio.to_thread(
        subprocess.run, [*args, uri], capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fail" not in out.lower(), out
    return out


def fencing_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fenced below key" in r.getMessage()]


# --- the ordering guarantee ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_preempt_waits_for_started_writes_and_discards_queued_ones(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writes are inside the backend (pool threads), four wait in the pool's queue.
    PREEMPT is acknowledged only after the two complete; the four never run."""
    with short_dir() as d:
        image = make_image(d)
        backend = GatedFile(image)

        async def scenario() -> None:
            async with running({"disk": backend}, d, threads=2) as (server, sock, tcp):
                addr = tcp if transport == "tcp" else sock
                victim = await NBDClient.connect(
                    addr, "disk", ClientSettings(request_timeout_s=30), register=("node2", 1)
                )
                writes = [
                    asyncio.create_task(victim.write(i * MiB, bytes([i + 1]) * 4096))
                    for i in range(6)
                ]
                for _ in range(2):  # two pool threads are inside the backend
                    assert await asyncio.to_thread(backend.entered.acquire, True, 10)
                await asyncio.sleep(0.2)  # the other four are queued in the pool
                preempting = asyncio.create_task(preempt(addr, "node2", below=2))
                results = await asyncio.gather(*writes, return_exceptions=True)
                # the victim's socket was closed at once: its requests fail without replies
                assert all(isinstance(r, NBDConnectionError) for r in results), results
                assert not preempting.done()  # two writes are still running
                assert backend.landed == []
                backend.gate.set()
                await asyncio.wait_for(preempting, 10)
                # the ACK came after the started writes landed, and only those
                assert sorted(backend.landed) == [0, MiB]
                await asyncio.sleep(0.3)  # give a discarded write every chance to land
                assert sorted(backend.landed) == [0, MiB]
                victim.abort("done")

        with caplog.at_level(logging.INFO, logger="shoal.nbd.server"):
            asyncio.run(asyncio.wait_for(scenario(), 60))
        backend.close()
        for i in range(6):
            want = bytes([i + 1]) * 4096 if i < 2 else bytes(4096)
            assert file_bytes(image, i * MiB, 4096) == want
    (line,) = fencing_lines(caplog)
    assert "holder node2 fenced below key 2" in line
    assert "1 connection(s) closed, 2 request(s) already running completed first" in line


def test_preempt_waits_for_started_async_tasks() -> None:
    backend = GatedMemory()

    async def scenario() -> None:
        with short_dir() as d:
            async with running({"mem": backend}, d) as (_, sock, _tcp):
                victim = await NBDClient.connect(sock, "mem", register=("node2", 1))
                writes = [
                    asyncio.create_task(victim.write(i * MiB, b"v" * 4096)) for i in range(3)
                ]
                while backend.entered < 3:
                    await asyncio.sleep(0.01)
                preempting = asyncio.create_task(preempt(sock, "node2", below=2))
                await asyncio.sleep(0.3)
                assert not preempting.done()  # the three tasks are still inside the backend
                backend.gate.set()
                await asyncio.wait_for(preempting, 10)
                assert sorted(backend.landed) == [0, MiB, 2 * MiB]
                results = await asyncio.gather(*writes, return_exceptions=True)
                assert all(isinstance(r, NBDConnectionError) for r in results), results  # no reply
                victim.abort("done")

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_writes_received_with_the_preempt_never_start() -> None:
    """The server's loop is held while the victim's writes and the PREEMPT arrive, so
    both are handled in one loop iteration: the writes become tasks that have not
    started, or stay unread. Either way none may land, and the PREEMPT is ACKed."""
    backend = GatedMemory()
    backend.gate.set()
    with short_dir() as d, serving({"mem": backend}, os.path.join(d, "s")) as srv:  # type: ignore[dict-item]
        victim = raw_registered(srv.sock, "node2", 1, b"mem")
        preemptor = raw_connect(srv.sock)
        recv_exact(preemptor, 18)
        preemptor.sendall(struct.pack(">I", 3))
        time.sleep(0.2)  # the server has read the client flags
        srv.loop.call_soon_threadsafe(time.sleep, 0.5)  # hold the server's loop
        time.sleep(0.1)
        victim.sendall(b"".join(write_request(i * 8192, b"x" * 4096, cookie=i) for i in range(8)))
        preemptor.sendall(option(Opt.SHOAL_PREEMPT, b'{"holder":"node2","below":2}'))
        assert read_reply(preemptor) == (Opt.SHOAL_PREEMPT, Rep.ACK, b"")
        time.sleep(0.3)
        assert backend.landed == [] and backend.entered == 0
        assert backend.data == bytes(SIZE)
        victim.close()
        preemptor.close()


def test_writes_sent_after_the_ack_hit_a_closed_socket() -> None:
    with short_dir() as d:
        image = make_image(d)
        backend = FileBackend(image)
        with serving({"disk": backend}, os.path.join(d, "s"), tcp=True) as srv:
            for holder, addr in (("node4", srv.sock), ("node5", ("127.0.0.1", srv.port))):
                victim = raw_registered(addr, holder, 1, b"disk")
                victim.sendall(write_request(0, b"a" * 4096, cookie=1))
                assert simple_reply(victim) == (0, 1)  # registered connections work
                asyncio.run(asyncio.wait_for(preempt(addr, holder, below=2), 10))
                with contextlib.suppress(OSError):  # EPIPE/ECONNRESET are fine too
                    victim.sendall(write_request(MiB, b"late" * 1024, cookie=2))
                    victim.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.FLUSH, 3, 0, 0))
                time.sleep(0.3)
                assert file_bytes(image, MiB, 4096) == bytes(4096)
                try:  # nothing was answered: EOF, or a reset on TCP
                    answer = victim.recv(1)
                except ConnectionResetError:
                    answer = b""
                assert answer == b""
                victim.close()
        backend.close()


# --- registration after a preempt -------------------------------------------------------


def test_old_keys_are_refused_new_keys_work_and_unregistered_clients_are_untouched() -> None:
    with short_dir() as d:
        image = make_image(d)
        backend = FileBackend(image)

        async def scenario() -> None:
            async with running({"disk": backend}, d) as (server, sock, tcp):
                uri = f"nbd+unix:///disk?socket={sock}"
                node2 = await NBDClient.connect(tcp, "disk", register=("node2", 1))
                node3 = await NBDClient.connect(tcp, "disk", register=("node3", 1))
                plain = await NBDClient.connect(sock, "disk")
                await node2.write(0, b"2" * 4096)
                await preempt(tcp, "node2", below=2)
                with pytest.raises(NBDConnectionError):
                    await node2.write(4096, b"stale")
                # other holders, unregistered clients and qemu-io carry on
                await node3.write(8192, b"3" * 4096)
                await plain.write(12288, b"p" * 4096)
                await qemu_io_async(uri, "write -P 0x71 1M 64k", "read -P 0x33 8k 4k")
                # the old key is refused, on connect and on reconnect (without retries)
                with pytest.raises(NBDFenced) as err:
                    await NBDClient.connect(tcp, "disk", register=("node2", 1))
                assert str(err.value) == FENCED_NODE2
                t = time.monotonic()
                with pytest.raises(NBDFenced, match="fenced below key 2"):
                    await node2.reconnect()
                assert time.monotonic() - t < 1
                # a newer key works, and is kept by later reconnects
                await node2.reconnect(key=2)
                await node2.write(4096, b"new key")
                await node2.reconnect()
                assert await node2.read(4096, 7) == b"new key"
                # floors never fall: a smaller PREEMPT changes nothing
                await preempt(sock, "node2", below=1)
                assert await node2.read(0, 4096) == b"2" * 4096
                assert server.floors.snapshot() == {"node2": 2}
                for c in (node2, node3, plain):
                    await c.close()

        asyncio.run(asyncio.wait_for(scenario(), 60))
        backend.close()
        assert file_bytes(image, 4096, 7) == b"new key"
        assert file_bytes(image, MiB, 65536) == b"\x71" * 65536


def test_a_fenced_registration_cannot_enter_transmission() -> None:
    """REGISTER accepted, then the holder is preempted by another connection before
    this one sends GO: its GO is refused with NBD_REP_ERR_POLICY."""
    with short_dir() as d:
        backend = FileBackend(make_image(d))
        with serving({"disk": backend}, os.path.join(d, "s")) as srv:
            s = raw_connect(srv.sock)
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", 3))
            s.sendall(option(Opt.SHOAL_REGISTER, b'{"holder":"node5","key":1}'))
            assert read_reply(s) == (Opt.SHOAL_REGISTER, Rep.ACK, b"")
            # the preemptor may be this very connection
            s.sendall(option(Opt.SHOAL_PREEMPT, b'{"holder":"node5","below":2}'))
            assert read_reply(s) == (Opt.SHOAL_PREEMPT, Rep.ACK, b"")
            s.sendall(option(Opt.GO, go_data(b"disk")))
            opt, rep, message = read_reply(s)
            assert (opt, rep) == (Opt.GO, Rep.ERR_POLICY)
            assert message == b"holder node5 is fenced below key 2; register with a newer key"
            s.close()
        backend.close()


# --- qemu-nbd does not know the options ----------------------------------------------------


@pytest.fixture
def qemu_nbd() -> Iterator[str]:
    require("qemu-nbd")
    with short_dir() as d:
        image = make_image(d)
        sock = os.path.join(d, "q.sock")
        proc = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-k", sock, image],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.05)
            yield sock
        finally:
            proc.terminate()
            proc.wait(10)


def test_fencing_against_qemu_nbd_says_what_to_do(qemu_nbd: str) -> None:
    expected = (
        f"the storage target at {qemu_nbd} does not support shoal fencing "
        "(NBD_OPT_SHOAL_REGISTER 0x53480001 unsupported); use `shoal nbd serve` as the target"
    )
    with pytest.raises(FencingUnsupported) as err:
        asyncio.run(NBDClient.connect(qemu_nbd, "", register=("node1", 1)))
    assert str(err.value).startswith(expected)
    with pytest.raises(FencingUnsupported, match="NBD_OPT_SHOAL_PREEMPT 0x53480002 unsupported"):
        asyncio.run(preempt(qemu_nbd, "node1", below=2))

    async def unregistered() -> None:  # and qemu-nbd is still fine for plain clients
        async with await NBDClient.connect(qemu_nbd, "") as c:
            await c.write(0, b"q" * 512)
            assert await c.read(0, 512) == b"q" * 512

    asyncio.run(asyncio.wait_for(unregistered(), 20))


# --- raw protocol helpers ---------------------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def read_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, length = wire.OPTION_REPLY.unpack(recv_exact(s, 20))
    assert magic == OPTION_REPLY_MAGIC
    return opt, rep, recv_exact(s, length)


def raw_registered(addr: str | tuple[str, int], holder: str, key: int, export: bytes) -> socket.socket:
    """A raw socket registered as ``holder``/``key``, past GO, without structured replies."""
    if isinstance(addr, str):
        s = raw_connect(addr)
    else:
        s = socket.create_connection(addr, timeout=10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    payload = f'{{"holder":"{holder}","key":{key}}}'.encode()
    s.sendall(option(Opt.SHOAL_REGISTER, payload))
    assert read_reply(s) == (Opt.SHOAL_REGISTER, Rep.ACK, b"")
    s.sendall(option(Opt.GO, go_data(export)))
    while read_reply(s)[1] != Rep.ACK:
        pass
    return s


def write_request(offset: int, data: bytes, cookie: int) -> bytes:
    return wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, cookie, offset, len(data)) + data


def simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, error, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(s, 16))
    assert magic == 0x67446698
    return error, cookie

