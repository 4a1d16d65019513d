"""``shoal nbd serve --volume``: every file of a volume is an export named by its path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from shoal.nbd.client import NBDClient, list_exports
from shoal.nbd.constants import ENOSPC, STATE_HOLE, STATE_ZERO
from shoal.nbd.errors import NBDCommandError
from shoal.nbd.volume_backend import VolumeExports
from shoal.volume import Volume
from tests.integration.nbd_helpers import require, run, serving, short_dir

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def shoal(*args: str) -> str:
    return run(sys.executable, "-m", "shoal", *args, timeout=60)


@pytest.fixture
def volume_server() -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    with short_dir() as work:
        image = os.path.join(work, "vol.img")
        sock = os.path.join(work, "s")
        shoal("volume", "format", image, "--size", "256M")
        shoal("file", "mkdir", "--volume", image, "/vm")
        shoal("file", "truncate", "--volume", image, "--size", "32M", "/vm/disk0.raw")
        shoal("file", "truncate", "--volume", image, "--size", "4M", "/small.raw")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "nbd", "serve", "--volume", image, "--socket", sock],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = (
                        proc.stderr.read().decode()
                        if proc.stderr and proc.poll() is not None
                        else ""
                    )
                    pytest.fail(f"shoal nbd serve did not start: {err}")
                time.sleep(0.05)
            yield image, sock, proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def uri(sock: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def test_volume_files_are_exports(volume_server: tuple[str, str, subprocess.Popen[bytes]]) -> None:
    require("qemu-io")
    image, sock, proc = volume_server
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert sorted(asyncio.run(list_exports(sock))) == ["/small.raw", "/vm/disk0.raw"]
    disk = uri(sock, "/vm/disk0.raw")
    run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5c 1M 64k",
        "-c",
        "write -P 0x6d 4M 3M",
        "-c",
        "flush",
        disk,
    )
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "read -P 0x5c 1M 64k", "-c", "read -P 0x6d 4M 3M",
        "-c", "read -P 0 0 1M",  # a hole reads as zeros
        "-c", "read -P 0 20M 1M",
        disk,
    )  # fmt: skip
    assert "Pattern verification failed" not in out

    async def scenario() -> None:
        async with await NBDClient.connect(sock, "/vm/disk0.raw", allocation=True) as c:
            assert c.size == 32 * MiB
            # writes into holes allocated whole units: [1M, 2M) and [4M, 7M)
            assert await c.block_status(0, 8 * MiB) == [
                (MiB, STATE_HOLE | STATE_ZERO),
                (MiB, 0),
                (2 * MiB, STATE_HOLE | STATE_ZERO),
                (3 * MiB, 0),
                (MiB, STATE_HOLE | STATE_ZERO),
            ]
            # TRIM frees the whole units inside the range only: [5M, 6M) here
            await c.trim(4 * MiB + 4096, 2 * MiB)
            bs = await c.block_status(4 * MiB, 3 * MiB)
            assert bs == [(MiB, 0), (MiB, STATE_HOLE | STATE_ZERO), (MiB, 0)]
            assert await c.read(5 * MiB, 4096) == bytes(4096)
            assert await c.read(4 * MiB, 4096) == b"\x6d" * 4096  # partial unit untouched
            # WRITE_ZEROES may free; with NO_HOLE it must not
            await c.write_zeroes(4 * MiB, MiB, no_hole=True)
            assert (await c.block_status(4 * MiB, MiB))[0] == (MiB, 0)
            await c.write_zeroes(6 * MiB, MiB)
            assert (await c.block_status(6 * MiB, MiB))[0] == (MiB, STATE_HOLE | STATE_ZERO)
            await c.write(31 * MiB, b"end!", fua=True)
            await c.flush()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not os.path.exists(sock)
    with Volume.open(image, writable=False) as vol:
        f = vol.open_file("/vm/disk0.raw")
        assert f.pread(MiB, 65536) == b"\x5c" * 65536
        assert f.pread(31 * MiB, 4) == b"end!"
        assert f.pread(4 * MiB, MiB) == bytes(MiB)


def test_unknown_export_is_refused(volume_server: tuple[str, str, subprocess.Popen[bytes]]) -> None:
    _, sock, _ = volume_server
    require("qemu-io")
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read 0 512", uri(sock, "/nope.raw")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "/nope.raw" in proc.stdout + proc.stderr


def test_cli_usage_errors_are_sentences() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "nbd",
            "serve",
            "--file",
            "/nonexistent/x.raw",
            "--socket",
            "/tmp/x",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "cannot open" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "nbd",
            "serve",
            "--file",
            "/dev/null",
            "--listen",
            "nohost",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_qemu_img_convert_through_a_volume_file_keeps_holes(
    volume_server: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    require("qemu-img")
    image, sock, _ = volume_server
    target = uri(sock, "/vm/disk0.raw")
    work = os.path.dirname(image)
    src, back = os.path.join(work, "src.raw"), os.path.join(work, "back.raw")
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        for off in (0, 5 * MiB, 6 * MiB, 31 * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, target, timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, target)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", target, back, timeout=120)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    for path in (target, back):
        entries = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", path))
        data = [(e["start"], e["start"] + e["length"]) for e in entries if e["data"]]
        assert data == [(0, MiB), (5 * MiB, 7 * MiB), (31 * MiB, 32 * MiB)], (path, data)


def test_a_full_volume_answers_enospc() -> None:
    with short_dir() as work:
        image = os.path.join(work, "vol.img")
        shoal("volume", "format", image, "--size", "64M")  # 54 units of 1 MiB
        shoal("file", "truncate", "--volume", image, "--size", "256M", "/big.raw")

        with Volume.open(image) as vol, serving(VolumeExports(vol), os.path.join(work, "s")) as srv:

            async def scenario() -> None:
                async with await NBDClient.connect(srv.sock, "/big.raw") as c:
                    for i in range(54):
                        await c.write(i * MiB, b"\x01" * 4096)
                    with pytest.raises(NBDCommandError) as err:
                        await c.write(100 * MiB, b"\x02" * 4096)
                    assert err.value.errno == ENOSPC
                    assert await c.read(0, 4096) == b"\x01" * 4096  # the connection goes on
                    await c.trim(0, MiB)  # freeing a unit makes room again
                    await c.write(100 * MiB, b"\x02" * 4096)

            asyncio.run(asyncio.wait_for(scenario(), 60))


def test_export_names_follow_renames(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An export is looked up by name each time: after /a is renamed to /b and a new /a
    is created, the name /a serves the new file, never the old inode."""
    from shoal.nbd.volume_backend import VolumeExports
    from shoal.volume import Volume, format_volume

    path = str(tmp_path / "v.img")
    format_volume(path, 64 << 20)
    with Volume.open(path) as vol:
        vol.create("/a", 1 << 20).pwrite(0, b"old!")
        exports = VolumeExports(vol)
        first = exports["/a"]
        vol.rename("/a", "/b")
        vol.create("/a", 1 << 20).pwrite(0, b"new!")
        second = exports["/a"]
        assert second is not first
        buf = bytearray(4)
        second.read_into(0, memoryview(buf))
        assert bytes(buf) == b"new!"
        assert exports["/b"] is first and exports["//b"] is first
