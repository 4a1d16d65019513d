"""Real peers: QEMU's NBD client (qemu-io, qemu-img) against our server, and our
client against qemu-nbd."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from shoal.nbd.backend import FileBackend
from shoal.nbd.client import NBDClient, list_exports
from shoal.nbd.constants import STATE_HOLE, STATE_ZERO, TxFlag
from tests.integration.nbd_helpers import (
    BackgroundServer,
    make_sparse_image,
    require,
    run,
    serving,
    short_dir,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture
def work() -> Iterator[str]:
    with short_dir() as d:
        yield d


@pytest.fixture
def served(work: str) -> Iterator[tuple[BackgroundServer, str]]:
    image = os.path.join(work, "export.raw")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    backend = FileBackend(image)
    with serving({"disk": backend}, os.path.join(work, "s")) as srv:
        yield srv, image
    backend.close()


def qemu_io(uri: str, *commands: str) -> str:
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def test_qemu_io_patterns_round_trip(served: tuple[BackgroundServer, str]) -> None:
    srv, image = served
    uri = srv.uri("disk")
    qemu_io(
        uri,
        "write -P 0xa5 0 1M",
        "write -P 0x5a 3M 64k",
        "write -P 0x11 5000 3000",  # unaligned
        "aio_write -P 0x22 10M 128k",
        "aio_write -P 0x33 20M 2M",
        "aio_flush",
        "write -z 40M 2M",
        "flush",
    )
    out = qemu_io(
        uri,
        "read -P 0xa5 0 4096",
        "read -P 0x11 5000 3000",
        "read -P 0xa5 8000 1040576",
        "read -P 0x5a 3M 64k",
        "read -P 0x22 10M 128k",
        "read -P 0x33 20M 2M",
        "read -P 0 40M 2M",
        "read -P 0 60M 1M",  # never written: a hole reads as zeros
    )
    assert out.count("read ") == 8
    # and the bytes really are in the file
    with open(image, "rb") as f:
        f.seek(5000)
        assert f.read(3000) == b"\x11" * 3000
        f.seek(20 * MiB)
        assert f.read(2 * MiB) == b"\x33" * (2 * MiB)
    # a wrong pattern is detected (the check above can fail)
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 512", uri], capture_output=True, text=True
    )
    assert "Pattern verification failed" in proc.stdout + proc.stderr


def qemu_map(target: str) -> list[dict[str, object]]:
    return list(json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", target)))


def data_ranges(entries: list[dict[str, object]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in entries:
        if e["data"]:
            start, length = int(e["start"]), int(e["length"])  # type: ignore[call-overload]
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + length)
            else:
                out.append((start, start + length))
    return out


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def test_qemu_img_convert_in_and_out_is_identical_and_keeps_holes(
    served: tuple[BackgroundServer, str], work: str
) -> None:
    require("qemu-img")
    srv, image = served
    uri = srv.uri("disk")
    src = os.path.join(work, "src.raw")
    back = os.path.join(work, "back.raw")
    chunks = {
        0: os.urandom(MiB),
        8 * MiB: os.urandom(3 * MiB),
        30 * MiB + 4096: os.urandom(65536),
        63 * MiB: b"\x01" * MiB,
    }
    make_sparse_image(src, 64 * MiB, chunks)
    # dirty the export first: holes must be re-created, not just skipped
    qemu_io(uri, "write -P 0xee 0 64M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri, timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back, timeout=120)
    assert sha(back) == sha(src) == sha(image)
    expected = data_ranges(qemu_map(src))
    assert expected == [
        (0, MiB),
        (8 * MiB, 11 * MiB),
        (30 * MiB + 4096, 30 * MiB + 69632),
        (63 * MiB, 64 * MiB),
    ]
    # holes survive: the export reports them over NBD, the export file and the copy are sparse
    assert data_ranges(qemu_map(uri)) == expected
    assert data_ranges(qemu_map(back)) == expected
    assert os.stat(image).st_blocks * 512 <= 8 * MiB
    assert os.stat(back).st_blocks * 512 <= 8 * MiB
    # a difference is detected (the comparison above can fail)
    qemu_io(uri, "write -P 0x99 40M 512")
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "mismatch at offset 41943040" in proc.stdout


def test_multi_conn_sees_flushed_writes(served: tuple[BackgroundServer, str]) -> None:
    srv, _ = served

    async def scenario() -> None:
        clients = [await NBDClient.connect(srv.sock, "disk") for _ in range(4)]
        try:
            assert all(c.flags & TxFlag.CAN_MULTI_CONN for c in clients)
            for i, writer in enumerate(clients):
                data = bytes([i + 1]) * 65536
                await writer.write(i * MiB, data)
                await writer.flush()
                for reader in clients:
                    assert await reader.read(i * MiB, 65536) == data
            # concurrent writers on distinct connections, one flush each, all visible everywhere
            await asyncio.gather(
                *(
                    c.write(32 * MiB + i * 4096, bytes([0x40 + i]) * 4096)
                    for i, c in enumerate(clients)
                )
            )
            await asyncio.gather(*(c.flush() for c in clients))
            for reader in clients:
                got = await reader.read(32 * MiB, 4 * 4096)
                assert got == b"".join(bytes([0x40 + i]) * 4096 for i in range(4))
        finally:
            for c in clients:
                await c.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    # QEMU's client opening several connections at once (qemu-img bench honours multi-conn too)
    qemu_io(srv.uri("disk"), "write -P 0x61 0 64k")
    qemu_io(srv.uri("disk"), "read -P 0x61 0 64k")


def test_our_client_against_qemu_nbd(work: str) -> None:
    qemu_nbd = require("qemu-nbd")
    image = os.path.join(work, "q.raw")
    make_sparse_image(image, 16 * MiB, {MiB: b"\x42" * MiB})
    sock = os.path.join(work, "q.sock")
    proc = subprocess.Popen(
        [qemu_nbd, "-f", "raw", "-t", "-e", "4", "-x", "lun", "-k", sock, image]
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)

        async def scenario() -> None:
            assert await list_exports(sock) == ["lun"]
            async with await NBDClient.connect(sock, "lun", allocation=True) as c:
                assert c.size == 16 * MiB and c.structured
                assert await c.read(MiB, 4096) == b"\x42" * 4096
                assert await c.read(0, 4096) == bytes(4096)
                await c.write(4 * MiB + 100, b"hello from shoal", fua=True)
                await c.write(5 * MiB, os.urandom(3 * MiB))  # larger than one chunk of anything
                await c.flush()
                assert await c.read(4 * MiB + 100, 16) == b"hello from shoal"
                status = await c.block_status(0, 16 * MiB)
                assert sum(n for n, _ in status) <= 16 * MiB
                assert status[0] == (MiB, STATE_HOLE | STATE_ZERO)
                await c.write_zeroes(MiB, MiB)
                assert await c.read(MiB, MiB) == bytes(MiB)
                await c.trim(5 * MiB, MiB)

        asyncio.run(asyncio.wait_for(scenario(), 30))
        with open(image, "rb") as f:
            f.seek(4 * MiB + 100)
            assert f.read(16) == b"hello from shoal"
    finally:
        proc.terminate()
        proc.wait(10)
