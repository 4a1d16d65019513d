"""A client that floods requests without reading replies costs the server bounded memory
and does not disturb another client."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

from shoal.nbd.backend import FileBackend
from shoal.nbd.client import NBDClient
from shoal.nbd.server import NBDServer

MiB = 1 << 20
_REQUEST_MAGIC = 0x25609513
_OPT_MAGIC = 0x49484156454F5054


def _flooder(sock_path: str, count: int, length: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    f = s.makefile("rb")
    f.read(18)
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    s.sendall(struct.pack(">QII", _OPT_MAGIC, 1, 0))  # NBD_OPT_EXPORT_NAME ""
    f.read(10)
    reqs = b"".join(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, 0, i, 0, length) for i in range(count))
    s.sendall(reqs)  # 2,000 READs of 4 MiB = 8 GiB of replies, never read
    return s


def test_flood_without_reading_replies_is_bounded(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)

    async def main() -> None:
        server = NBDServer({"": FileBackend(str(img))}, threads=2)
        sock = str(tmp_path / "s.sock")
        await server.listen_unix(sock)
        loop = asyncio.get_running_loop()
        flood = await loop.run_in_executor(None, _flooder, sock, 2000, 4 * MiB)
        try:
            await asyncio.sleep(1.0)
            conn = next(iter(server._conns))
            assert conn.transport is not None
            buffered = conn.transport.get_write_buffer_size() + len(conn._out)
            assert buffered < 64 * MiB, f"{buffered >> 20} MiB of replies buffered for one client"
            # another client is served normally meanwhile
            client = await NBDClient.connect(sock, "")
            try:
                await asyncio.wait_for(client.write(0, b"ok" * 2048), 10)
                assert await asyncio.wait_for(client.read(0, 4096), 10) == b"ok" * 2048
            finally:
                await client.close()
        finally:
            flood.close()
            await server.close()

    asyncio.run(main())


def _read_replies_slowly(s: socket.socket, count: int, length: int) -> list[tuple[int, bytes]]:
    """Simple replies (handle, data), read in small pieces with pauses, so the server's
    transport has queued, unsent replies most of the time."""
    s.setblocking(True)
    f = s.makefile("rb")
    out = []
    for i in range(count):
        if i % 64 == 0:
            import time

            time.sleep(0.02)
        magic, error, handle = struct.unpack(">IIQ", f.read(16))
        assert magic == 0x67446698 and error == 0, (hex(magic), error)
        out.append((handle, f.read(length)))
    return out


def test_replies_queued_by_the_transport_are_never_overwritten(tmp_path: Path) -> None:
    """uvloop (like Python 3.12) keeps views of data it could not send yet: the server must
    not write into its output buffer again while the transport still holds it."""
    import os

    import uvloop

    img = tmp_path / "disk.raw"
    content = os.urandom(8 * MiB)
    img.write_bytes(content)
    count, length = 1500, 64 << 10

    async def main() -> None:
        server = NBDServer({"": FileBackend(str(img))}, threads=2)
        sock = str(tmp_path / "s.sock")
        await server.listen_unix(sock)
        loop = asyncio.get_running_loop()
        try:
            s = await loop.run_in_executor(None, _flooder_at, sock, count, length)
            try:
                replies = await loop.run_in_executor(None, _read_replies_slowly, s, count, length)
            finally:
                s.close()
        finally:
            await server.close()
        for handle, data in replies:
            off = (handle * length) % len(content)
            assert data == content[off:off + length], f"reply {handle} carries other bytes"

    uvloop.run(main())


def _flooder_at(sock_path: str, count: int, length: int) -> socket.socket:
    """Like _flooder, each READ at a different offset (handle i reads block i)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    f = s.makefile("rb")
    f.read(18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", _OPT_MAGIC, 1, 0))
    f.read(10)
    blocks = (8 * MiB) // length
    reqs = b"".join(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, 0, i, (i % blocks) * length, length)
                    for i in range(count))
    import threading

    threading.Thread(target=s.sendall, args=(reqs,), daemon=True).start()
    return s
