"""The metadata service: the coordinator's side of every node's metadata requests.

Transport-agnostic: :meth:`MetadataService.handle` takes ``(node, op, args)`` and returns
a JSON object (see :mod:`shoal.coordinator.messages`); the agent feeds it from the
channel, tests call it in-process. Each op also has its own async method. Every blocking
:class:`~shoal.volume.volume.Volume` call runs on a thread executor, never on the loop.

Map holders. ``open`` and ``allocate`` hand a node a file's extent map and register the
node as a *holder* of it at that ``map_version``; ``close`` drops it, and so does a
revocation. ``map_version`` grows on every change to a file's map or size.

Revocation protocol (DESIGN §3 "Maps"), for every op that moves or frees a file's units
(shrinking ``resize``, ``remove``, ``trim`` and ``zero`` that free whole units)::

    take the file's lock (no map of this file is handed out until we release it)
    bump map_version to v
    revoke(holder, ino, v) for every holder but the requester, all at once,
        each within settings.revoke_timeout_s
    any not acknowledged in time -> on_unresponsive(holder) for each; NOTHING is freed;
        the silent holder stays registered (the agent fences it, then calls
        forget_node). ``resize`` and ``remove`` fail with RevokeFailed ("in-use");
        ``trim`` succeeds having freed nothing (a hint); ``zero`` writes zeros in place
    all acknowledged -> drop those holders; free (the Volume transaction)    <- commit point
    release the file's lock

Allocation only adds runs, so it revokes nobody: other holders' maps stay true, they
just show as holes some units another node has since mapped. A node therefore treats a
hole in its cached map as a hint: it asks again before it reads zeros from it or
allocates it (``MapCache.resolve``, ``ensure_allocated``).

Zeroed pool. An allocation must not map a unit before zeros on it are durable (a
node reads the LUN directly). The service keeps up to ``zeroed_pool_units`` free units
ahead of the allocation cursor zeroed and flushed (:meth:`Volume.prezero`, refilled in
the background whenever an allocation left fewer than half), so a typical allocation
is one journal write. The pool lives in memory only: a new coordinator starts empty.

A node acknowledges a revocation only after it has dropped the map and its in-flight
direct I/O through that map has finished (:mod:`shoal.coordinator.maps`). The requester
drops its own map before it asks, so it is not revoked.

Invariant: **a node never holds a map to a unit the coordinator freed.** Units are freed
only after every holder acknowledged; while they are being freed the file's lock keeps
any new map from being handed out; after, the map no longer contains them. A node never
installs a map older than one it was revoked to (versions only grow).

Lock order: the service's per-file asyncio lock → (in the executor thread) the Volume's
own order (file I/O lock → allocation lock → ``Volume._lock`` → journal). Never the other
way: the Volume never calls back into the service. The per-file lock is held across the
revoke round trip, so a node must never wait for the coordinator while it holds a map in
use (see ``maps``), or it and the revocation wait for each other until the timeout.

Cancellation: a cancelled request waits for its executor call to finish before the file
lock is released, so a map is never handed out while a free is half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from shoal.coordinator import messages as msg
from shoal.coordinator.errors import InvalidRequest, LeaseLost, NotCoordinator, RevokeFailed
from shoal.volume.errors import DeviceError, IsADirectory, NotFound, VolumeError
from shoal.volume.volume import Volume, VolumeFile

log = logging.getLogger(__name__)

T = TypeVar("T")
Revoke = Callable[[str, int, int], Awaitable[None]]

#: op name on the wire -> method name
OPS: dict[str, str] = {
    "open": "open", "map": "refresh", "allocate": "allocate", "close": "release",
    "create": "create", "mkdir": "mkdir", "remove": "remove", "rename": "rename",
    "resize": "resize", "list": "listdir", "stat": "stat", "trim": "trim", "zero": "zero",
}


@dataclass(frozen=True)
class MetadataSettings:
    #: how long every holder gets to acknowledge a map revocation
    revoke_timeout_s: float = 5.0
    #: threads running blocking Volume calls
    executor_threads: int = 4
    #: free units kept zeroed ahead of allocation (0: none); refilled below half
    zeroed_pool_units: int = 64

    def __post_init__(self) -> None:
        if self.revoke_timeout_s <= 0 or self.executor_threads < 1:
            raise ValueError("revoke_timeout_s must be > 0 and executor_threads >= 1")


class MetadataService:
    """Serves one open writable volume. Use from one event loop; ``close`` when done."""

    def __init__(self, vol: Volume, *, revoke: Revoke, settings: MetadataSettings | None = None,
                 on_unresponsive: Callable[[str], None] | None = None):
        self.vol = vol
        self.settings = settings or MetadataSettings()
        self._revoke = revoke
        self._on_unresponsive = on_unresponsive or (lambda node: None)
        self._executor = ThreadPoolExecutor(self.settings.executor_threads, thread_name_prefix="shoal-meta")
        self._locks: dict[int, asyncio.Lock] = {}
        self._versions: dict[int, int] = {}
        #: ino -> node -> map_version it was handed
        self.holders: dict[int, dict[str, int]] = {}
        self._refill: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
        self._executor.shutdown(wait=True)

    def _refill_pool(self) -> None:
        """Start topping the zeroed pool up if it fell below half (one refill at a time)."""
        want = self.settings.zeroed_pool_units
        if len(self.vol.meta.zeroed) * 2 >= want or (self._refill is not None and not self._refill.done()):
            return

        async def refill() -> None:
            try:
                # a few units a step: closing the service (a hand-over) waits for one step only
                while len(self.vol.meta.zeroed) < want:
                    if not await self._run(lambda: self.vol.prezero(min(8, want - len(self.vol.meta.zeroed)))):
                        break
            except (VolumeError, NotCoordinator, LeaseLost) as err:
                log.info("zeroing free units ahead of allocation stopped: %s", err)

        self._refill = asyncio.get_running_loop().create_task(refill())

    # ---- plumbing --------------------------------------------------------------------

    async def handle(self, node: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One request -> its result, or ``{"error", "message"}`` for a refused one."""
        try:
            self._check_intact()
            name = OPS.get(op)
            if name is None:
                raise InvalidRequest(f"unknown metadata operation {op!r}; known: {', '.join(sorted(OPS))}")
            method = getattr(self, name)
            try:
                inspect.signature(method).bind(node, **args)
            except TypeError as err:
                raise InvalidRequest(f"bad arguments for {op}: {err}") from err
            result: dict[str, Any] = await method(node, **args)
            return result
        except Exception as err:
            if (self.vol.failure is not None or isinstance(err, DeviceError)) and not isinstance(err, NotCoordinator):
                # our own LUN I/O failed, or a journal write did (memory is ahead of the
                # disk, nothing may be handed out from it): the node retries the request
                # once the volume is replayed here or the role moved to a node with a path
                err = NotCoordinator(f"the coordinator stopped serving {self.vol.sb.name or 'the volume'} "
                                     f"after a write error ({err}); retry")
            if msg.error_code(err) is None:
                raise
            log.info("%s from %s refused: %s", op, node, err)
            return msg.encode_error(err)

    def _check_intact(self) -> None:
        if self.vol.failure is not None:
            raise NotCoordinator("the coordinator's volume stopped after a write error; retry once it is "
                                 "replayed")

    async def _run(self, fn: Callable[[], T]) -> T:
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await fut
            raise

    def _lock(self, ino: int) -> asyncio.Lock:
        return self._locks.setdefault(ino, asyncio.Lock())

    def version(self, ino: int) -> int:
        return self._versions.setdefault(ino, (self.vol.epoch << 32) | 1)

    def _bump(self, ino: int) -> int:
        self._versions[ino] = self.version(ino) + 1
        return self._versions[ino]

    def _file(self, ino: int) -> VolumeFile:
        f = VolumeFile(self.vol, ino)
        with self.vol._lock:
            node = self.vol.meta.inodes.get(ino)
        if node is None:
            raise NotFound(f"file {ino} does not exist (removed?); open it again by path")
        if node.is_dir:
            raise IsADirectory(f"{self.vol.meta.path_of(ino)} is a directory, not a file")
        return f

    def _map_of(self, ino: int) -> dict[str, Any]:
        self._check_intact()  # never hand out a map that includes a change not on disk
        f = self._file(ino)
        return msg.encode_map(ino, f.size, f.unit_size, self.version(ino), f.extent_map())

    async def _hand_out(self, node: str, ino: int, first: Callable[[], object] | None = None) -> dict[str, Any]:
        """The file's map, now held by ``node``; ``first`` runs before the map is taken,
        in the same thread hop. Caller holds the file's lock."""

        def work() -> dict[str, Any]:
            if first is not None:
                first()
            return self._map_of(ino)

        result = await self._run(work)
        self.holders.setdefault(ino, {})[node] = result["map_version"]
        return result

    async def _resolve(self, ino: int | None, path: str | None) -> int:
        if ino is not None:
            _ints(ino=ino)
            return ino
        if not isinstance(path, str):
            raise InvalidRequest("give the file as ino (an integer) or path (a string)")
        vol = self.vol
        return (await self._run(lambda: vol.open_file(path))).ino

    async def _revoke_holders(self, requester: str, ino: int) -> None:
        """Bump the version and revoke every other holder; caller holds the file's lock."""
        version = self._bump(ino)
        held = self.holders.get(ino, {})
        held.pop(requester, None)
        others = sorted(held)
        if not others:
            return

        async def one(node: str) -> str | None:
            try:
                async with asyncio.timeout(self.settings.revoke_timeout_s):
                    await self._revoke(node, ino, version)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("%s did not acknowledge revoking its map of file %d: %s", node, ino, err or "timeout")
                return node

        results = await asyncio.gather(*(one(n) for n in others))
        failed = [n for n in results if n is not None]
        for node in others:
            if node not in failed:
                held.pop(node, None)
        if failed:
            for node in failed:
                self._on_unresponsive(node)
            raise RevokeFailed(
                f"{', '.join(failed)} did not give up its map of file {ino} within "
                f"{self.settings.revoke_timeout_s:g}s; nothing was freed (retry once the node is fenced)",
                nodes=failed,
            )

    def forget_node(self, node: str) -> None:
        """Drop every map ``node`` holds: after it was fenced, or it left the cluster."""
        for held in self.holders.values():
            held.pop(node, None)

    # ---- maps ------------------------------------------------------------------------

    async def open(self, node: str, path: str) -> dict[str, Any]:
        _strs(path=path)
        vol = self.vol
        ino = (await self._run(lambda: vol.open_file(path))).ino
        async with self._lock(ino):
            return await self._hand_out(node, ino)

    async def refresh(self, node: str, ino: int) -> dict[str, Any]:
        _ints(ino=ino)
        async with self._lock(ino):
            return await self._hand_out(node, ino)

    async def allocate(self, node: str, ino: int, offset: int, length: int) -> dict[str, Any]:
        """Map the holes of the range (zeroed, durable) and return the file's map."""
        _ints(ino=ino, offset=offset, length=length)
        async with self._lock(ino):
            def fill_holes() -> None:
                f = self._file(ino)
                if offset + length > f.size:
                    raise InvalidRequest(
                        f"range {offset}+{length} is past the end of file {ino} (size {f.size}); resize it first")
                if f.allocate(offset, length):
                    self._bump(ino)  # we hold the file's lock: nobody else bumps it meanwhile

            result = await self._hand_out(node, ino, fill_holes)
            self._refill_pool()
            return result

    async def release(self, node: str, ino: int) -> dict[str, Any]:
        """The node closed the file: it holds no map of it any more."""
        _ints(ino=ino)
        self.holders.get(ino, {}).pop(node, None)
        return {}

    # ---- namespace -------------------------------------------------------------------

    async def create(self, node: str, path: str, size: int = 0, preallocate: bool = False) -> dict[str, Any]:
        _ints(size=size)
        _strs(path=path)
        vol = self.vol

        def work() -> dict[str, Any]:
            vol.create(path, size, preallocate=bool(preallocate))
            return vol.stat(path).to_json()

        return await self._run(work)

    async def mkdir(self, node: str, path: str, parents: bool = False) -> dict[str, Any]:
        _strs(path=path)
        vol = self.vol
        return (await self._run(lambda: vol.mkdir(path, parents=parents))).to_json()

    async def rename(self, node: str, src: str, dst: str) -> dict[str, Any]:
        _strs(src=src, dst=dst)
        vol = self.vol
        await self._run(lambda: vol.rename(src, dst))
        return {}

    async def listdir(self, node: str, path: str = "/") -> dict[str, Any]:
        _strs(path=path)
        vol = self.vol
        return {"entries": [s.to_json() for s in await self._run(lambda: vol.listdir(path))]}

    async def stat(self, node: str, path: str) -> dict[str, Any]:
        _strs(path=path)
        vol = self.vol
        return (await self._run(lambda: vol.stat(path))).to_json()

    # ---- operations that free units: revoke first ------------------------------------

    async def remove(self, node: str, path: str) -> dict[str, Any]:
        """Remove a file or an empty directory (no recursion: a client removes children first)."""
        _strs(path=path)
        vol = self.vol
        st = await self._run(lambda: vol.stat(path))
        async with self._lock(st.ino):
            if st.kind == "file":
                await self._revoke_holders(node, st.ino)
            await self._run(lambda: self._remove_same(path, st.ino))
            self.holders.pop(st.ino, None)
            self._bump(st.ino)
        return {}

    def _remove_same(self, path: str, ino: int) -> None:
        if self.vol.stat(path).ino != ino:  # replaced while we revoked: refuse, do not guess
            raise NotFound(f"{path} changed while it was being removed; retry")
        self.vol.remove(path)

    async def resize(self, node: str, size: int, ino: int | None = None, path: str | None = None) -> dict[str, Any]:
        _ints(size=size)
        ino = await self._resolve(ino, path)
        async with self._lock(ino):
            old = await self._run(lambda: self._file(ino).size)
            if size < old:
                await self._revoke_holders(node, ino)
            else:
                self._bump(ino)
            await self._run(lambda: self._file(ino).resize(size))
            return await self._hand_out(node, ino)

    async def trim(self, node: str, ino: int, offset: int, length: int) -> dict[str, Any]:
        """Free the whole units inside the range (TRIM); partial units stay. When a
        holder does not give up its map, nothing is freed and the trim still succeeds:
        a trim is a hint (NBD lets a server ignore it)."""
        return await self._freeing("trim", node, ino, offset, length, lambda f: f.discard(offset, length),
                                   instead=lambda f: None)

    async def zero(self, node: str, ino: int, offset: int, length: int) -> dict[str, Any]:
        """Make the range read as zeros; whole units in it become holes (thin files).
        When a holder does not give up its map, zeros are written in place instead
        (nothing is freed, so every map stays true)."""
        return await self._freeing("zero", node, ino, offset, length, lambda f: f.write_zeroes(offset, length),
                                   instead=lambda f: f.write_zeroes(offset, length, free=False))

    async def _freeing(self, op: str, node: str, ino: int, offset: int, length: int,
                       action: Callable[[VolumeFile], None], instead: Callable[[VolumeFile], None]) -> dict[str, Any]:
        """``action`` frees units, after the other holders gave up their maps; if one
        does not (RevokeFailed: the agent fences it), ``instead``, which frees nothing."""
        _ints(ino=ino, offset=offset, length=length)
        async with self._lock(ino):
            if await self._run(lambda: _frees_units(self._file(ino), offset, length)):
                try:
                    await self._revoke_holders(node, ino)
                except RevokeFailed as err:
                    log.warning("%s of file %d at %d+%d: %s; done without freeing", op, ino, offset, length, err)
                    action = instead
            await self._run(lambda: action(self._file(ino)))
            return await self._hand_out(node, ino)


def _ints(**values: Any) -> None:
    for name, value in values.items():
        msg.int_arg({name: value}, name)


def _strs(**values: Any) -> None:
    for name, value in values.items():
        msg.str_arg({name: value}, name)


def _frees_units(f: VolumeFile, offset: int, length: int) -> bool:
    """Would freeing the whole units of the range unmap anything?"""
    U = f.unit_size
    if f.preallocated:
        return False
    first, end = -(-offset // U) * U, (offset + length) // U * U
    end = min(end, f.size)
    if end <= first:
        return False
    try:
        return any(not hole for _, _, hole in f.block_status(first, end - first))
    except VolumeError:
        return False  # out of range: the action itself raises the right error
