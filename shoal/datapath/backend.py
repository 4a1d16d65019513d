"""The NBD side of a volume on a node: one export per file, I/O through cached maps.

:class:`FileExports` resolves an export name (a file path such as ``vm/disk0.raw``) by
asking the coordinator to *open* the file, which hands this node the file's extent map;
:class:`FileBackend` then serves the export:

==================  ==============================================================
READ                resolve the range in the cached map (holes are only hints:
                    a range with holes is looked up again), hold the map, read each
                    mapped segment through the router, zeros for true holes
WRITE               ensure the range is allocated (one RPC only when it has holes),
                    hold the map, write each segment through the router
WRITE_ZEROES        the coordinator frees whole units and zeroes the edges (RPC);
                    with NO_HOLE, zeros are written like data
TRIM                the coordinator frees whole units (RPC)
FLUSH / FUA         FLUSH on the LUN (direct or through the coordinator)
BLOCK_STATUS        from the map: holes are HOLE|ZERO
==================  ==============================================================

The router decides direct or redirected per block request. In maintenance mode the
volume is *file-level* redirected instead: the coordinator may move extents (defrag),
so the node holds no maps and sends file requests, which the coordinator performs
through its own open volume.

A map revoked between the lookup and the hold raises ``MapUnavailable``; the request
is simply looked up again. Nothing waits for the coordinator while it holds a map
except block requests, which the coordinator serves without any file lock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Protocol

from shoal.coordinator.errors import MapUnavailable, MetadataError
from shoal.coordinator.maps import MapCache
from shoal.datapath.errors import DataPathError, PathFailed, RedirectAgain
from shoal.datapath.router import BlockRouter
from shoal.nbd.backend import AsyncBackend, ExportResolver, Extent, ReadDone
from shoal.nbd.constants import STATE_HOLE, STATE_ZERO
from shoal.nbd.errors import BackendError

log = logging.getLogger(__name__)

MAP_RETRIES = 400  # about 90 s of waiting at the longest
_ZEROS = bytes(1 << 20)


class VolumeAccess(Protocol):
    """What a file backend needs from the node's runtime of its volume."""

    name: str
    maps: MapCache
    router: BlockRouter

    async def ready(self) -> None:
        """Wait while I/O must wait; raise Fenced when this node may not do I/O."""

    def ready_now(self) -> bool:
        """True when :meth:`ready` would return at once, without raising."""

    def file_level(self) -> bool:
        """True in maintenance mode: file requests go to the coordinator."""

    async def file_io(self, kind: str, ino: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        """A file request performed by the coordinator (maintenance mode)."""


def _error(what: str, err: Exception) -> BackendError:
    code = errno.EIO
    if isinstance(err, MetadataError) and err.code == "full":
        code = errno.ENOSPC
    return BackendError(f"{what} failed: {err}", code)


async def _all_done(tasks: list[asyncio.Future[bytes]]) -> None:
    """Wait until every task ended, even if we are cancelled meanwhile (then re-raise):
    a segment write already sent must not outlive the map hold that covers it."""
    cancelled = False
    pending = set(tasks)
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved here; result() below raises it
    if cancelled:
        raise asyncio.CancelledError


def _then(task: asyncio.Future[bytes], done: ReadDone) -> None:
    """Call ``done`` with the task's outcome when it ends."""

    def ended(t: asyncio.Future[bytes]) -> None:
        if t.cancelled():
            done(None, asyncio.CancelledError())
        elif t.exception() is not None:
            done(None, t.exception())
        else:
            done(t.result(), None)

    task.add_done_callback(ended)


class FileBackend(AsyncBackend):
    can_multi_conn = True

    def __init__(self, access: VolumeAccess, ino: int, path: str, size: int):
        self.access = access
        self.ino = ino
        self.description = f"{access.name}:{path}"
        self._size = size

    @property
    def size(self) -> int:
        m = self.access.maps.cached(self.ino)
        return self._size if m is None else m.size

    async def _mapped(self, what: str, offset: int, length: int, fn: object, *, allocate: bool) -> list[bytes] | None:
        """Run ``fn(lun_offset, file_offset, length)`` for each segment under a held map.

        Returns None when the volume went file-level (maintenance) meanwhile: the caller
        then sends the request to the coordinator instead. Leaves the hold only once every
        segment's I/O has ended, even when cancelled (a write already sent must not be
        in flight once the map is given up)."""
        maps = self.access.maps
        for attempt in range(MAP_RETRIES):
            if attempt:
                # revoked under us (a free, a coordinator change, maintenance): the drop
                # completes once the I/O using the old map has drained
                await asyncio.sleep(min(0.005 * attempt, 0.25))
            try:
                if allocate:
                    await maps.ensure_allocated(self.ino, offset, length)
                else:
                    await maps.resolve(self.ino, offset, length)
                with maps.using(self.ino) as m:
                    if self.access.file_level():
                        return None
                    segs = m.segments(offset, length)
                    if allocate and any(lun is None for _, lun, _ in segs):
                        continue  # trimmed meanwhile: allocate again
                    tasks = [asyncio.ensure_future(fn(lun, f, n)) for f, lun, n in segs]  # type: ignore[operator]
                    await _all_done(tasks)
                    return [t.result() for t in tasks]
            except MapUnavailable:
                continue
        raise BackendError(f"{what}: the map of file {self.ino} kept changing; retry", errno.EAGAIN)

    def read_now(self, offset: int, length: int, done: ReadDone) -> bool:
        """The common read, started from the server's callback with no task of its own:
        ready, not in maintenance, one mapped segment of a cached map, and the router
        can send it now (direct, or through the coordinator). The map stays held until
        the data is back. False (nothing started) when any of that does
        not hold: the server runs :meth:`read` as a task instead."""
        access = self.access
        if not access.ready_now() or access.file_level():
            return False
        hold = access.maps.using(self.ino)
        try:
            m = hold.take()
        except MapUnavailable:
            return False  # not cached, or revoked: read() looks it up
        segs = m.segments(offset, length)
        started = False
        try:
            if len(segs) == 1 and segs[0][1] is not None:

                def landed(data: bytes | None, err: BaseException | None) -> None:
                    hold.release()
                    if isinstance(err, (PathFailed, RedirectAgain)):  # read() redirects, waits, retries
                        _then(asyncio.ensure_future(self.read(offset, length)), done)
                    else:
                        done(data, err)

                started = access.router.start_read(segs[0][1], length, landed)
            return started
        finally:
            if not started:
                hold.release()

    async def read(self, offset: int, length: int) -> bytes:
        try:
            await self.access.ready()
            if self.access.file_level():
                return await self.access.file_io("read", self.ino, offset, length)
            router = self.access.router

            try:
                # fast path: one mapped segment under the held map, read without a task
                # of its own (a read that outlives the hold when cancelled cannot harm
                # anything, unlike a write)
                with self.access.maps.using(self.ino) as m:
                    segs = m.segments(offset, length)
                    if len(segs) == 1 and segs[0][1] is not None and not self.access.file_level():
                        return await router.read(segs[0][1], length)
            except MapUnavailable:
                pass  # not cached, or revoked: the general path looks it up

            async def seg(lun: int | None, f: int, n: int) -> bytes:
                return bytes(n) if lun is None else await router.read(lun, n)

            parts = await self._mapped("read", offset, length, seg, allocate=False)
            if parts is None:
                return await self.access.file_io("read", self.ino, offset, length)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except (DataPathError, MetadataError) as err:
            raise _error("read", err) from err

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        data = bytes(data)  # ours before the first await, whatever buffer the server lent us
        try:
            await self.access.ready()
            if self.access.file_level():
                await self.access.file_io("write", self.ino, offset, len(data), bytes(data))
            else:
                router = self.access.router
                view = memoryview(data)

                async def seg(lun: int | None, f: int, n: int) -> bytes:
                    assert lun is not None
                    whole = f == offset and n == len(data)
                    await router.write(lun, data if whole else bytes(view[f - offset:f - offset + n]))
                    return b""

                if await self._mapped("write", offset, len(data), seg, allocate=True) is None:
                    await self.access.file_io("write", self.ino, offset, len(data), data)
            if fua:
                await self.flush()
        except (DataPathError, MetadataError) as err:
            raise _error("write", err) from err

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        if not may_trim:
            end = offset + length
            while offset < end:
                n = min(len(_ZEROS), end - offset)
                await self.write(offset, _ZEROS[:n])
                offset += n
        else:
            try:
                await self.access.ready()
                await self.access.maps.zero(self.ino, offset, length)
            except (DataPathError, MetadataError) as err:
                raise _error("write zeroes", err) from err
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        try:
            await self.access.ready()
            await self.access.maps.trim(self.ino, offset, length)
        except (DataPathError, MetadataError) as err:
            raise _error("trim", err) from err

    async def flush(self) -> None:
        try:
            await self.access.ready()
            if self.access.file_level():
                await self.access.file_io("flush", self.ino, 0, 0)
            else:
                await self.access.router.flush()
        except (DataPathError, MetadataError) as err:
            raise _error("flush", err) from err

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        try:
            await self.access.ready()
            segs = await self.access.maps.resolve(self.ino, offset, length)
        except (DataPathError, MetadataError, MapUnavailable) as err:
            raise _error("block status", err) from err
        out: list[Extent] = []
        for _, lun, n in segs:
            flags = STATE_HOLE | STATE_ZERO if lun is None else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
        return out


class FileExports(ExportResolver):
    """Export name -> FileBackend, opening the file at the coordinator."""

    def __init__(self, access: VolumeAccess):
        self.access = access
        self._backends: dict[int, FileBackend] = {}

    @staticmethod
    def path_of(name: str) -> str:
        return "/" + name.strip("/")

    async def resolve(self, name: str) -> FileBackend | None:
        path = self.path_of(name)
        await self.access.ready()
        try:
            m = await self.access.maps.open(path)
        except MetadataError as err:
            if err.code in ("not-found", "is-a-directory", "not-a-directory", "invalid-name"):
                return None
            raise
        backend = self._backends.get(m.ino)
        if backend is None:
            backend = self._backends[m.ino] = FileBackend(self.access, m.ino, path, m.size)
        return backend

    async def names(self) -> list[str]:
        out: list[str] = []

        async def walk(d: str) -> None:
            for e in await self.access.maps.listdir(d):
                if e.get("kind") == "directory":
                    await walk(str(e["path"]))
                else:
                    out.append(str(e["path"]).lstrip("/"))

        await walk("/")
        return out
