"""A node's cache of extent maps, and its client of the metadata service.

The node asks the coordinator for a file's map (``open``), then does data I/O straight
to the LUN at the mapped offsets. The coordinator revokes the map before it moves or
frees the file's units (see :mod:`shoal.coordinator.metadata`); this module makes the
acknowledgement mean something: **the node acknowledges only when no I/O is still using
the old map**, so a node never holds (or writes through) a map to a unit the
coordinator freed.

Per file: the cached :class:`FileMap` (or none), a count of I/Os *using* it, and a
``revoking`` flag. The data path does::

    await cache.ensure_allocated(ino, offset, length)     # before a write into holes
    with cache.using(ino) as m:                           # never blocks; raises
        segments = m.segments(offset, length)             # MapUnavailable if revoked
        ... pread/pwrite on the LUN ...

``using`` is a shared hold that never waits: if the map was revoked (or never fetched)
it raises :class:`MapUnavailable` and the caller refreshes and retries. ``revoke``
drops the map at once (new ``using`` fail), then waits for the users to leave, then
returns, which is the acknowledgement. Holds may be released from any thread (data I/O
runs in threads), so the counter sits under a ``threading.Lock`` and the last one out
wakes the revoker through its loop.

A hole in a cached map is a hint, not a fact: allocation by another node does not revoke
(it only adds runs), so before a read returns zeros for a hole the node asks again
(:meth:`MapCache.resolve`).

Rule: never wait for the coordinator while inside ``using`` (the coordinator may be
waiting for you to leave it, holding the file's lock): finish or drop the hold first.

Versions: a revoke names the version the file's map will have; the cache then refuses
to install any older map (a reply that crossed the revocation), so the cache never goes
back to a map from before a free.

Lock order: a file's ``_FileState.lock`` (threading, held only for counter updates,
never across an await) is a leaf.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.coordinator import messages as msg
from shoal.coordinator.errors import InvalidRequest, MapUnavailable, MetadataError

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
Segment = tuple[int, int | None, int]  # (file offset, LUN offset or None for a hole, length)


@dataclass(frozen=True)
class FileMap:
    ino: int
    size: int
    unit_size: int
    version: int
    extents: tuple[tuple[int, int, int], ...]

    @classmethod
    def decode(cls, result: dict[str, Any]) -> FileMap:
        try:
            return cls(int(result["ino"]), int(result["size"]), int(result["unit_size"]),
                       int(result["map_version"]), tuple(msg.decode_extents(result["extents"])))
        except (KeyError, TypeError, ValueError, InvalidRequest) as err:
            raise MetadataError(f"the coordinator sent a malformed map: {err}", code="io-error") from err

    def segments(self, offset: int, length: int) -> list[Segment]:
        """Cover ``[offset, offset+length)`` with mapped segments and holes, in order."""
        out: list[Segment] = []
        pos, end = offset, offset + length
        i = max(bisect.bisect_right([e[0] for e in self.extents], pos) - 1, 0)
        while pos < end:
            ext = self.extents[i] if i < len(self.extents) else None
            if ext is None or pos < ext[0]:
                stop = end if ext is None else min(end, ext[0])
                out.append((pos, None, stop - pos))
                pos = stop
                continue
            f, lun, n = ext
            if pos >= f + n:
                i += 1
                continue
            stop = min(end, f + n)
            out.append((pos, lun + (pos - f), stop - pos))
            pos = stop
            i += 1
        return out

    def holes(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(s, n) for s, lun, n in self.segments(offset, length) if lun is None]


@dataclass
class _FileState:
    map: FileMap | None = None
    floor: int = 0  # never install a map older than this (the last revoked-to version)
    users: int = 0
    revoking: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    drained: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)


class _Hold:
    """One I/O's hold on a file's map (a class, not a generator: it is on every I/O).
    ``with`` it, or ``take`` and ``release`` it when the I/O ends in a callback."""

    __slots__ = ("st", "ino")

    def __init__(self, st: _FileState, ino: int):
        self.st = st
        self.ino = ino

    def __enter__(self) -> FileMap:
        return self.take()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take(self) -> FileMap:
        """The map, held; raises MapUnavailable when it is revoked or not cached."""
        st = self.st
        with st.lock:
            if st.map is None or st.revoking:
                raise MapUnavailable(f"the map of file {self.ino} was revoked; refresh it and retry", ino=self.ino)
            st.users += 1
            return st.map

    def release(self) -> None:
        st = self.st
        with st.lock:
            st.users -= 1
            wake = list(st.drained) if not st.users and st.drained else None
        for loop, event in wake or ():
            loop.call_soon_threadsafe(event.set)


class MapCache:
    """Cached maps of this node's open files plus the metadata calls that change them.

    ``call(op, args)`` sends one request to the coordinator and returns its result (the
    agent passes the channel's call; tests a :class:`MetadataService` in-process).
    """

    def __init__(self, call: Call):
        self._call = call
        self._files: dict[int, _FileState] = {}

    async def request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return msg.check_result(await self._call(op, args))

    def _state(self, ino: int) -> _FileState:
        st = self._files.get(ino)  # (on every I/O: build a new state only when there is none)
        return st if st is not None else self._files.setdefault(ino, _FileState())

    def install(self, result: dict[str, Any]) -> FileMap:
        """Cache a map the coordinator sent (never older than the cached one or the floor)."""
        new = FileMap.decode(result)
        st = self._state(new.ino)
        with st.lock:
            if new.version < st.floor:
                raise MapUnavailable(
                    f"the coordinator's map of file {new.ino} (version {new.version}) is older than a "
                    f"revocation this node acknowledged (version {st.floor}); fetch it again", ino=new.ino)
            if st.map is None or new.version >= st.map.version:
                st.map = new
            return st.map

    def cached(self, ino: int) -> FileMap | None:
        st = self._files.get(ino)
        return None if st is None else st.map

    # ---- maps ------------------------------------------------------------------------

    async def open(self, path: str) -> FileMap:
        return self.install(await self.request("open", {"path": path}))

    async def refresh(self, ino: int) -> FileMap:
        return self.install(await self.request("map", {"ino": ino}))

    async def map(self, ino: int) -> FileMap:
        """The cached map, fetched again if it was revoked."""
        return self.cached(ino) or await self.refresh(ino)

    def lookup(self, ino: int, offset: int, length: int) -> list[Segment]:
        """LUN segments and holes of the range from the cached map (no request)."""
        m = self.cached(ino)
        if m is None:
            raise MapUnavailable(f"this node has no map of file {ino}; refresh it", ino=ino)
        return m.segments(offset, length)

    async def resolve(self, ino: int, offset: int, length: int) -> list[Segment]:
        """Segments for a read: a hole in the cached map is only a hint (another node may
        have filled it since), so a range with holes is looked up again before the caller
        reads zeros from it."""
        m = self.cached(ino)
        if m is None or m.holes(offset, length) or offset + length > m.size:
            m = await self.refresh(ino)
        return m.segments(offset, length)

    async def ensure_allocated(self, ino: int, offset: int, length: int) -> FileMap:
        """A map in which the range has no holes (asks the coordinator only if it has)."""
        m = self.cached(ino)
        if m is not None and offset + length <= m.size and not m.holes(offset, length):
            return m
        return self.install(await self.request("allocate", {"ino": ino, "offset": offset, "length": length}))

    async def close(self, ino: int) -> None:
        self._files.pop(ino, None)
        await self.request("close", {"ino": ino})

    def using(self, ino: int) -> _Hold:
        """``with cache.using(ino) as m``: hold the file's map for one I/O (shared; never
        waits, see the module doc)."""
        return _Hold(self._state(ino), ino)

    async def revoke(self, ino: int, version: int) -> None:
        """Drop the map, wait until no I/O uses it, then return (= acknowledge)."""
        st = self._state(ino)
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with st.lock:
            st.floor = max(st.floor, version)
            if st.map is not None and st.map.version < version:
                st.map = None
            st.revoking += 1
            st.drained.append(entry)
            if not st.users:
                event.set()
        try:
            await event.wait()
        finally:
            with st.lock:
                st.revoking -= 1
                st.drained.remove(entry)

    async def _drop(self, ino: int) -> None:
        st = self._state(ino)
        with st.lock:
            st.map = None
        await self.revoke(ino, 0)

    async def drop_all(self) -> None:
        """Drop every cached map and wait for the I/O using them (the coordinator changed:
        the new one knows no holders, so no map may outlive the change)."""
        for ino in list(self._files):
            await self._drop(ino)

    async def _dropping(self, ino: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """An op that frees units: drop our own map first (we are not revoked), wait for
        our own I/O through it, then ask; install the map it returns."""
        await self._drop(ino)
        result = await self.request(op, args)
        if "map_version" in result:
            self.install(result)
        return result

    # ---- namespace and freeing ops ---------------------------------------------------

    async def create(self, path: str, size: int = 0, *, preallocate: bool = False) -> dict[str, Any]:
        return await self.request("create", {"path": path, "size": size, "preallocate": preallocate})

    async def mkdir(self, path: str, *, parents: bool = False) -> dict[str, Any]:
        return await self.request("mkdir", {"path": path, "parents": parents})

    async def rename(self, src: str, dst: str) -> None:
        await self.request("rename", {"src": src, "dst": dst})

    async def listdir(self, path: str = "/") -> list[dict[str, Any]]:
        return list((await self.request("list", {"path": path}))["entries"])

    async def stat(self, path: str) -> dict[str, Any]:
        return await self.request("stat", {"path": path})

    async def remove(self, path: str) -> None:
        st = await self.stat(path)
        if st["kind"] == "file":
            await self._drop(int(st["ino"]))
            self._files.pop(int(st["ino"]), None)
        await self.request("remove", {"path": path})

    async def resize(self, ino: int, size: int) -> FileMap:
        return self.install(await self._dropping(ino, "resize", {"ino": ino, "size": size}))

    async def trim(self, ino: int, offset: int, length: int) -> FileMap:
        return self.install(await self._dropping(ino, "trim", {"ino": ino, "offset": offset, "length": length}))

    async def zero(self, ino: int, offset: int, length: int) -> FileMap:
        return self.install(await self._dropping(ino, "zero", {"ino": ino, "offset": offset, "length": length}))
