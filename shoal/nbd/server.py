"""asyncio NBD server: listening sockets, shared state and fencing around the connections.

:class:`NBDServer` serves exports found in a mapping name -> backend or through
an :class:`ExportResolver`; backends are blocking (:class:`Backend`, run inline
or in the server's thread pool) or coroutine-based (:class:`AsyncBackend`, run
as tasks on this loop). Each connection is a
:class:`~shoal.nbd.server_connection.Connection` (receive/execute/reply and
back-pressure are described there). Connections share only the backends, the
thread pool and the fencing floors; a peer breaking the protocol is logged as
one line and hard-disconnected without touching the others.

Fencing (always available; payloads and the floor table in ``fencing.py``).
A PREEMPT of holder H below key K runs in this order, and the order is the
guarantee:

1. H's floor becomes max(floor, K) (REGISTER and GO check it from now on);
2. every connection registered as H with a key below the floor is fenced, in
   the same loop callback: work not started is discarded without reply, the
   socket is closed abortively, so nothing it sends afterwards is read;
3. the work of those connections that had already entered a backend (a pool
   thread or a task) is awaited to completion;
4. only then is the PREEMPT acknowledged, and one line logged.

So once the ACK is out, no write sent on a fenced connection can still land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.nbd.backend import AnyBackend, ExportResolver
from shoal.nbd.errors import NBDError
from shoal.nbd.fencing import FloorTable, PreemptOrder
from shoal.nbd.server_connection import Connection
from shoal.nbd.server_work import BufferPool

log = logging.getLogger(__name__)

Exports = Mapping[str, AnyBackend] | ExportResolver


class NBDServer:
    """Serves exports on unix and TCP sockets.

    ``exports`` is a mapping export-name -> backend (looked up synchronously,
    e.g. :class:`~shoal.nbd.volume_backend.VolumeExports`) or an
    :class:`ExportResolver` (looked up by a coroutine while the handshake waits).
    """

    def __init__(self, exports: Exports, *, threads: int = 4):
        self.exports = exports
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nbd-io")
        #: buffers for the pool's READ and WRITE jobs, reused (see server_work)
        self.buffers = BufferPool()
        #: fencing floors per holder, for every export of this server
        self.floors = FloorTable()
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[Connection] = set()
        self._unix_paths: list[str] = []

    @property
    def connections(self) -> int:
        """Connections open, or closed with a request still running in a backend."""
        return len(self._conns)

    def fence(
        self, order: PreemptOrder, *, by: Connection
    ) -> tuple[int, int, list[asyncio.Future[Any]]]:
        """Steps 1 and 2 of a PREEMPT (module docstring), without yielding.

        Returns the holder's floor now, how many connections were fenced, and the
        futures of their work already running, which the caller awaits before it
        acknowledges. ``by`` itself is spared: its registration is checked at GO.
        """
        floor = self.floors.raise_floor(order)
        fenced = 0
        running: list[asyncio.Future[Any]] = []
        for conn in list(self._conns):
            reg = conn.registration
            if conn is by or reg is None or reg.holder != order.holder or reg.key >= floor:
                continue
            running.extend(conn.fence())
            fenced += 1
        return floor, fenced, running

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket created mode 0600 (a stale socket file is replaced)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(path)
            old = os.umask(0o177)
            try:
                sock.bind(path)
                # listen at once: a client that sees the file must not get ECONNREFUSED
                sock.listen(100)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: Connection(self), sock=sock
            )
        except OSError as err:
            sock.close()
            raise NBDError(f"cannot listen on unix socket {path}: {err.strerror}") from err
        self._unix_paths.append(path)
        self._servers.append(server)

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the bound port (useful with port 0)."""
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: Connection(self), host, port, reuse_address=True
            )
        except OSError as err:
            raise NBDError(f"cannot listen on {host}:{port}: {err.strerror}") from err
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.close("server shutting down", logging.INFO)
        # tasks were cancelled; they still have to unwind (a cancelled task sends no reply)
        pending = [f for conn in conns for f in conn.pending_work()]
        if pending:
            await asyncio.wait(pending)
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # threads may still be inside a backend call: wait for them off the loop
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NBDError(f"{path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise NBDError(f"another server is listening on {path}")


