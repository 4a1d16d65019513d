"""Helpers for the NBD tests: a server on a background event loop, tool checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping

import pytest

from shoal.nbd.backend import Backend
from shoal.nbd.server import NBDServer

PACKAGES = {
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
}


def require(tool: str) -> str:
    """Path of ``tool``; fail (never skip) with what to install when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed; install it with: apt-get install {PACKAGES.get(tool, tool)}"
        )
    return path


def run(*cmd: str, timeout: float = 60) -> str:
    """Run a command; on failure, fail the test with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class BackgroundServer:
    """An :class:`NBDServer` running on its own event loop thread."""

    def __init__(self, backends: Mapping[str, Backend], sock: str, *, tcp: bool = False):
        self.backends = backends
        self.sock = sock
        self.tcp = tcp
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.server: NBDServer | None = None
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="nbd-test-server", daemon=True
        )

    def start(self) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self.server = NBDServer(self.backends)
        await self.server.listen_unix(self.sock)
        if self.tcp:
            self.port = await self.server.listen_tcp("127.0.0.1", 0)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def connections(self) -> int:
        assert self.server is not None
        return self.server.connections


@contextlib.contextmanager
def short_dir() -> Iterator[str]:
    """A short temporary directory: unix socket paths must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="nbdt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(
    backends: Mapping[str, Backend], sock: str, *, tcp: bool = False
) -> Iterator[BackgroundServer]:
    server = BackgroundServer(backends, sock, tcp=tcp).start()
    try:
        yield server
    finally:
        server.stop()


def raw_connect(sock: str, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_eof(s: socket.socket) -> bytes:
    """Everything until the peer closes (fails the test on timeout)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def make_sparse_image(path: str, size: int, chunks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    os.sync()
