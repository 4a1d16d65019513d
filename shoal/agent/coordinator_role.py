"""The coordinator's part of a volume on the node that holds the lease.

Becoming coordinator (:meth:`CoordinatorRole.become`), in this order (DESIGN §3)::

    lease taken (Election.acquire, or take_over at the holder's request)
    preempt the previous holder's registrations at the storage target   <- no stale write
    open the volume on our own path: replay the journal, epoch on every record
    serve metadata, block and file requests
    announce to every node; each drops its maps (failover) or keeps them (planned
    move: the holders table came with the hand-over) and acknowledges. A node that
    does not acknowledge is fenced. Until every node acknowledged, nothing is freed.

Every T/2 (:meth:`tick`): the lease guard (still ours, renewals current), quorum (a
coordinator that sees fewer than half the nodes steps down and frees the lease), the
storage path (lost: hand the role to a node with a working path), and fencing: a node
whose liveness slot did not change for 8T — judged only while our own reads succeed,
so when every node loses the LUN nobody is fenced — is preempted at the target and its
maps forgotten; it must rejoin with a new generation.

Requests (:meth:`handle`): ``csv.meta`` metadata ops (MetadataService), ``csv.io``
block I/O for a node without a path (after preempting its failed key), ``csv.fio``
file I/O in maintenance mode, ``csv.confirm`` "was I fenced?".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from shoal.agent.vm_registry import VMRegistry
from shoal.agent.volumes import LONG_LANE, REVOKE_LANE
from shoal.coordinator.errors import LeaseLost, NotCoordinator
from shoal.coordinator.metadata import MetadataService, MetadataSettings
from shoal.datapath.errors import PathFailed
from shoal.datapath.lun import make_key
from shoal.membership import NodeState
from shoal.nbd.client import preempt
from shoal.nbd.errors import FencingUnsupported, NBDError
from shoal.netft.errors import NetftError
from shoal.util.pipes import Piped, drain_pipe
from shoal.volume.errors import DeviceError, VolumeError
from shoal.volume.lease import FREE, CoordinatorLease, LeaseArea, SlotWatcher
from shoal.volume.volume import Volume, VolumeFile

if TYPE_CHECKING:
    from shoal.agent.volumes import VolumeRuntime

log = logging.getLogger("shoal.agent.coordinator")

T = TypeVar("T")
FREEING_OPS = {"remove", "resize", "trim", "zero"}
#: a planned hand-over leaves up to this much journal for the successor to replay
HANDOVER_REPLAY_MAX = 4 << 20
#: before a planned hand-over pauses anything, a journal longer than this is
#: checkpointed (while requests still run): the successor, whose reads of the LUN under
#: load cost milliseconds each, then replays only what follows (769 records took 40 ms)
HANDOVER_CHECKPOINT_MIN = 64 << 10


class PreemptFailed(Exception):
    """The storage target could not be told to preempt a node (it may still write)."""


def _not_coordinator(why: str) -> dict[str, Any]:
    return {"error": "not-coordinator", "message": why}


class CoordinatorRole:
    def __init__(self, rt: VolumeRuntime):
        self.rt = rt
        self.vol: Volume | None = None
        self.service: MetadataService | None = None
        self.serving = False
        self.accepting = False
        self.synced = asyncio.Event()
        self.vol_ready = asyncio.Event()
        self.fenced_gen: dict[str, int] = {}
        self.preempted: dict[str, int] = {}
        self._preempt_locks: dict[str, asyncio.Lock] = {}
        self.fencing_supported: bool | None = None
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._watcher: SlotWatcher | None = None
        self._minority_since: float | None = None
        self.became_at = 0.0
        self.vms = VMRegistry(self)
        #: one administrative operation at a time (move, repair, maintenance on/off):
        #: a move in the middle of a defrag, or maintenance cleared under it, would
        #: pull the ground from under it; ``admin_what`` says which one runs
        self.admin = asyncio.Lock()
        self.admin_what = ""

    @property
    def me(self) -> str:
        return self.rt.node

    @property
    def epoch(self) -> int:
        assert self.rt.election is not None
        return self.rt.election.epoch

    # ---- becoming coordinator ----------------------------------------------------------

    async def become(self, previous: CoordinatorLease | None, **kw: Any) -> None:
        """Take up the role (see the module doc); on any failure, resign and leave it."""
        try:
            await self._become(previous, **kw)
        except BaseException as err:
            if not self.serving:
                log.error("%s: could not become coordinator: %s", self.rt.name, err)
                assert self.rt.election is not None
                self.rt.election.resign(f"could not take up the role: {err}")
                self.rt.role = None
            if not isinstance(err, Exception):
                raise

    async def _become(self, previous: CoordinatorLease | None, *, preempt_below: int | None = None,
                     planned: bool = False, holders: dict[str, dict[str, int]] | None = None,
                     fenced: dict[str, int] | None = None, maintenance: bool = False,
                     clean_seq: int | None = None) -> None:
        rt = self.rt
        t0 = time.monotonic()
        self.fenced_gen.update(fenced or {})
        prev = rt.node_name(previous.owner) if previous is not None and previous.owner != FREE else None
        if prev is not None and not planned:
            if preempt_below is None:
                preempt_below = rt.path.key if prev == self.me else await self._next_generation_key(prev)
            await self.preempt(prev, preempt_below)
        assert rt.election is not None
        election = rt.election
        try:
            await self._open_volume(clean_seq)
        except Exception as err:
            log.error("%s: could not open the volume as coordinator: %s", rt.name, err)
            election.resign(f"could not open the volume: {err}")
            rt.role = None
            return
        self._new_service(holders)
        self.vol_ready.set()
        self.serving = self.accepting = True
        if rt.renewer is not None:
            rt.renewer.lapsed = False  # we hold the lease: nobody fenced us
        self.became_at = time.monotonic()
        rt.set_maintenance_flag(maintenance)
        rt.set_coordinator(self.me, self.epoch, f"this node is coordinator (epoch {self.epoch})")
        if not planned:
            await rt.drop_maps()
        log.warning("%s: %s is coordinator, epoch %d (%s; volume open after %.0f ms)", rt.name, self.me,
                    self.epoch, "planned move" if planned else f"previous holder {prev or 'none'}",
                    (time.monotonic() - t0) * 1000)
        rt.agent.event("coordinator", volume=rt.name, node=self.me, epoch=self.epoch, planned=planned)
        rt._spawn(self._announce(keep_maps=planned))

    def _new_service(self, holders: dict[str, dict[str, int]] | None) -> None:
        assert self.vol is not None
        settings = MetadataSettings(revoke_timeout_s=max(5.0, 4 * self.rt.io_timeout_s))
        self.service = MetadataService(self.vol, revoke=self._revoke, settings=settings,
                                       on_unresponsive=self._unresponsive)
        for ino, held in (holders or {}).items():
            self.service.holders[int(ino)] = {str(n): int(v) for n, v in held.items()}

    async def _announce(self, *, keep_maps: bool) -> None:
        rt = self.rt

        async def one(peer: str) -> None:
            try:
                # a node acknowledges once the I/O through its old maps finished: give it time
                await rt.agent.call_peer(peer, "csv.coordinator", {
                    "volume": rt.name, "node": self.me, "epoch": self.epoch,
                    "keep_maps": keep_maps, "maintenance": rt.maintenance},
                    timeout_s=max(10.0, 8 * rt.io_timeout_s))
            except (NetftError, TimeoutError) as err:
                if keep_maps:
                    return  # its maps are in the holders table: revocation reaches or fences it
                # nothing may be freed while it may still hold an old map: fence it, or retry
                while self.serving and not await self.fence(
                        peer, None, f"it did not acknowledge the new coordinator: {err or 'timeout'}"):
                    await asyncio.sleep(self.rt.io_timeout_s)

        await asyncio.gather(*(one(p.name) for p in rt.agent.peers))
        self.synced.set()

    async def _next_generation_key(self, node: str) -> int:
        assert self.rt.direct_dev is not None and self.rt.sb is not None
        area = LeaseArea(self.rt.direct_dev, self.rt.sb)
        slot = await self.rt.run_lease(lambda: area.read_slot(self.rt.node_id_of(node)))
        return make_key(slot.generation + 1, 0)

    # ---- fencing ---------------------------------------------------------------------------

    async def preempt(self, node: str, below: int) -> None:
        """Make every registration of ``node`` with a key below ``below`` unable to write.

        Raises PreemptFailed when the target could not be told (a timeout, a lost
        connection): the caller must not act as if the node were fenced. Only a target
        that does not know the option at all (qemu-nbd) lets us go on, said once."""
        if below <= self.preempted.get(node, 0):
            return  # done already (every redirected request asks): no lock, no await
        lock = self._preempt_locks.setdefault(node, asyncio.Lock())
        async with lock:
            if below <= self.preempted.get(node, 0):
                return
            addr = self.rt.address
            try:
                async with asyncio.timeout(4 * self.rt.io_timeout_s):
                    await preempt((addr.host, addr.port), node, below)
                self.fencing_supported = True
            except FencingUnsupported as err:
                if self.fencing_supported is not False:
                    log.error("%s: cannot preempt %s at the storage target %s: %s. Without storage fencing "
                              "a write still travelling on its old path could land late.", self.rt.name,
                              node, addr, err)
                self.fencing_supported = False
                return
            except (NBDError, OSError, TimeoutError) as err:
                raise PreemptFailed(f"could not preempt {node} at {addr}: {err or 'timed out'}") from err
            self.preempted[node] = below
            log.warning("%s: preempted %s's registrations below key %#x at %s", self.rt.name, node, below, addr)
            whole = below & 0xFFFFFFFF == 0  # every attempt of generations below below >> 32
            self.rt.agent.event("preempt", volume=self.rt.name, node=node, below=below,
                                generations_below=(below >> 32) if whole else None)

    async def fence(self, node: str, generation: int | None, why: str) -> bool:
        """Fence ``node``; True once it is (or already was) fenced, False if it could not be."""
        if node == self.me:
            return False
        if generation is None:
            assert self.rt.direct_dev is not None and self.rt.sb is not None
            area = LeaseArea(self.rt.direct_dev, self.rt.sb)
            try:
                generation = (await self.rt.run_lease(lambda: area.read_slot(self.rt.node_id_of(node)))).generation
            except DeviceError:
                return False
        if generation <= self.fenced_gen.get(node, -1):
            return True
        try:
            await self.preempt(node, make_key(generation + 1, 0))
        except PreemptFailed as err:
            log.warning("%s: fencing %s failed: %s", self.rt.name, node, err)
            return False
        self.fenced_gen[node] = generation
        if self.service is not None:
            self.service.forget_node(node)
        log.warning("%s: fenced %s (generation %d): %s", self.rt.name, node, generation, why)
        self.rt.agent.event("fence", volume=self.rt.name, node=node, generation=generation, why=why)
        return True

    def _unresponsive(self, node: str) -> None:
        self.rt._spawn(self.fence(node, None, "it did not give up a map in time"))

    async def _revoke(self, node: str, ino: int, version: int) -> None:
        if node == self.me:
            await self.rt.maps.revoke(ino, version)
            return
        result, _, _ = await self.rt.agent.call_peer(
            node, "csv.revoke", {"volume": self.rt.name, "ino": ino, "version": version}, lane=REVOKE_LANE)
        if isinstance(result, dict) and result.get("error"):
            raise RuntimeError(str(result.get("message")))

    # ---- the periodic step -------------------------------------------------------------

    async def tick(self) -> None:
        rt = self.rt
        assert rt.election is not None
        if not rt.path.up:
            rt._start_probe()
            await self.hand_over_for_path_loss()
            return
        try:
            await rt.run_lease(rt.election.guard)
        except DeviceError:
            if not rt.path.up:  # the path failed under the guard's read: probe it, hand over
                rt._start_probe()
                await self.hand_over_for_path_loss()
            return
        except (LeaseLost, NotCoordinator) as err:
            await self.step_down(f"lost the lease: {err}", release=False)
            return
        if self.vol is not None and self.vol.failure is not None:
            await self._reopen(f"a metadata write failed ({self.vol.failure})")
            return
        if not rt.has_quorum():
            now = time.monotonic()
            self._minority_since = self._minority_since or now
            if now - self._minority_since >= rt.agent.cfg.timing.link_down_after_s:
                await self.step_down("this node sees fewer than half of the cluster's nodes", release=True)
                return
        else:
            self._minority_since = None
        await self._watch_slots()
        self.vms.start_failover_step()

    async def _reopen(self, why: str) -> None:
        """Replay the journal into a fresh volume: memory was ahead of the disk."""
        log.warning("%s: %s reopens the volume: %s", self.rt.name, self.me, why)
        await self.reopen(checkpoint=False)

    async def reopen(self, *, checkpoint: bool, between: Callable[[], T] | None = None) -> T | None:
        """Stop serving, close the volume, run ``between`` (blocking, e.g. fsck) on the
        closed volume, open it again with the map holders kept, serve again. If the
        volume does not open again the role is given up."""
        rt = self.rt
        await self._quiesce()
        holders = self._holders()
        self.vol_ready.clear()
        await rt.run_blocking(lambda: self._close_volume(checkpoint=checkpoint))
        result = None
        try:
            if between is not None:
                result = await rt.run_blocking(between)
        finally:
            try:
                await self._open_volume()
            except Exception as err:  # noqa: BLE001 - cannot serve: give the role up
                await self.step_down(f"could not reopen the volume: {err}", release=False)
            else:
                self._new_service(holders)
                self.accepting = True
                self.vol_ready.set()
        return result

    async def _open_volume(self, clean_seq: int | None = None) -> None:
        """Open (replay) the volume on our own path as the lease's epoch, writes guarded."""
        rt = self.rt
        election, dev = rt.election, rt.direct_dev
        assert election is not None and dev is not None
        self.vol = await rt.run_blocking(lambda: Volume.open_device(
            dev, offline=False, epoch=election.epoch, guard=election.guard, clean_seq=clean_seq))

    def _holders(self) -> dict[str, dict[str, int]]:
        """Who holds which file's map, as it travels (hand-over) or survives a reopen."""
        assert self.service is not None
        return {str(ino): dict(held) for ino, held in self.service.holders.items()}

    async def _watch_slots(self) -> None:
        rt = self.rt
        assert rt.direct_dev is not None and rt.sb is not None
        if self._watcher is None:
            self._watcher = SlotWatcher(LeaseArea(rt.direct_dev, rt.sb), rt.timing)
        watcher = self._watcher
        peers = [(p.name, p.id) for p in rt.agent.peers]
        try:
            judged = await rt.run_lease(lambda: [(n, *watcher.judge(i)) for n, i in peers])
        except DeviceError:
            self._watcher = None  # our reads fail: judge nobody by time we could not see
            return
        fresh_s = 3 * rt.io_timeout_s
        for node, slot, dead in judged:
            rt.agent.set_disk_alive(node, watcher.fresh_until(rt.node_id_of(node), fresh_s))
            if dead and slot.generation > 0:
                await self.fence(node, slot.generation, "its liveness slot stopped advancing for 8 I/O timeouts")

    # ---- giving the role up ----------------------------------------------------------------

    async def _quiesce(self) -> None:
        self.accepting = False
        while self.inflight:
            self._idle.clear()
            await self._idle.wait()

    async def step_down(self, why: str, *, release: bool) -> None:
        rt = self.rt
        if not self.serving:
            return
        log.warning("%s: %s steps down as coordinator: %s", rt.name, self.me, why)
        self.serving = self.accepting = False
        self.vol_ready.clear()
        await rt.run_blocking(lambda: self._close_volume(checkpoint=release))
        assert rt.election is not None
        if release:
            try:
                await rt.run_blocking(rt.election.release)
            except DeviceError:
                rt.election.resign(why)
        else:
            rt.election.resign(why)
        rt.role = None
        rt.set_coordinator(None, rt.epoch, f"stepped down: {why}")

    def _close_volume(self, *, checkpoint: bool, handing_over: bool = False) -> None:
        """Blocking (volume I/O through the loop): run it in the executor.

        ``handing_over`` (a planned move): every change is already durable in the
        journal, so the volume is closed without a checkpoint unless the journal since
        the last one is longer than HANDOVER_REPLAY_MAX; the successor replays it
        (reads), which under write load is far cheaper than two more flushes here."""
        if self.service is not None:
            self.service.close()
        vol, self.vol = self.vol, None
        if vol is not None:
            if not checkpoint:
                vol._broken = VolumeError("the coordinator stepped down")  # no more writes from us
            try:
                vol.close(checkpoint=not handing_over or vol.journal_bytes > HANDOVER_REPLAY_MAX)
            except (VolumeError, LeaseLost, NotCoordinator) as err:
                log.warning("%s: closing the volume: %s", self.rt.name, err)

    async def hand_over(self, target: str, *, planned: bool) -> dict[str, Any]:
        """Give the role to ``target``. Planned: the volume is closed cleanly and the
        holders table travels with the role. Returns the target's answer."""
        rt = self.rt
        assert rt.election is not None and self.service is not None
        if planned:
            # flush the LUN and checkpoint while I/O still runs: the flushes inside the
            # pause (the successor's lease write) find little dirty data left on the
            # target, and the successor replays only the journal written since the
            # checkpoint (last: the flush may take long while allocations go on)
            with contextlib.suppress(PathFailed):
                await rt.path.flush(control=True)
            vol = self.vol
            if vol is not None and vol.failure is None and vol.journal_bytes > HANDOVER_CHECKPOINT_MIN:
                try:
                    await rt.run_blocking(vol.checkpoint)
                except (VolumeError, LeaseLost, NotCoordinator) as err:  # the close then does
                    log.warning("%s: checkpoint before the hand-over: %s", rt.name, err)
        t0 = time.monotonic()
        await self._quiesce()
        t_quiet = time.monotonic()
        holders = self._holders()
        lease = rt.election.lease
        assert lease is not None
        vol = self.vol
        await rt.run_blocking(lambda: self._close_volume(checkpoint=planned, handing_over=planned))
        t_closed = time.monotonic()
        clean_seq = vol.last_seq if planned and vol is not None and vol.failure is None else None
        self.serving = False
        self.vol_ready.clear()
        rt.election.resign(f"handing the role to {target}")
        args = {"volume": rt.name, "from": self.me, "epoch": lease.epoch, "planned": planned,
                "holders": holders, "fenced": self.fenced_gen, "maintenance": rt.maintenance,
                "preempt_below": None if planned else rt.path.key + 1, "clean_seq": clean_seq}
        try:
            result, _, _ = await rt.agent.call_peer(target, "csv.takeover", args, lane=LONG_LANE,
                                                    timeout_s=max(30.0, 16 * rt.io_timeout_s))
            if not isinstance(result, dict) or not result.get("ok"):
                raise RuntimeError(str(result.get("message") if isinstance(result, dict) else result))
        except (NetftError, RuntimeError) as err:
            rt.role = None
            rt.set_coordinator(None, rt.epoch, f"hand-over to {target} failed: {err}")
            raise RuntimeError(f"{target} did not take the coordinator role of {rt.name}: {err}") from err
        rt.role = None
        rt.set_coordinator(target, lease.epoch + 1, f"handed the role to {target}")
        return {"from": self.me, "to": target, "paused_ms": round((time.monotonic() - t0) * 1000, 1),
                "epoch": lease.epoch + 1, "target_ms": result.get("open_ms"), "replayed": result.get("replayed"),
                "quiesce_ms": round((t_quiet - t0) * 1000, 1), "close_ms": round((t_closed - t_quiet) * 1000, 1)}

    async def hand_over_for_path_loss(self) -> None:
        rt = self.rt
        for p in rt.agent.peers:
            if rt.agent.membership.state(p.name) is not NodeState.UP:
                continue
            try:
                state, _, _ = await rt.agent.call_peer(p.name, "csv.state", {"volume": rt.name})
            except NetftError:
                continue
            if isinstance(state, dict) and state.get("path_up"):
                try:
                    await self.hand_over(p.name, planned=False)
                    return
                except RuntimeError as err:
                    log.warning("%s: %s", rt.name, err)
                    return
        log.warning("%s: coordinator %s lost its storage path and no node with a working path answers",
                    rt.name, self.me)

    # ---- requests ------------------------------------------------------------------------

    async def handle(self, peer: str, op: str, args: dict[str, Any],
                     payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
        """A request from ``peer`` (this node too). The answer's payload may wait in a
        pipe (a block read for another node: ``util.pipes``) only when ``peer`` is not
        this node; so may the request's (a large block write from another node: the
        channel's ``pipe_payload``)."""
        if not (self.serving and self.accepting):
            return _not_coordinator(f"{self.me} is not serving {self.rt.name} now"), b""
        gen = int(args.get("gen", 0))
        if peer != self.me and 0 < gen <= self.fenced_gen.get(peer, -1):
            return {"error": "fenced", "message": f"{peer} (generation {gen}) was fenced from {self.rt.name}; "
                    "rejoin"}, b""
        self.inflight += 1
        try:
            if op == "csv.meta":
                return await self._meta(peer, args), b""
            if op == "csv.io":
                return await self._block_io(peer, args, payload)
            if op == "csv.fio":
                return await self._file_io(args, drain_pipe(payload) if isinstance(payload, Piped) else payload)
            if op == "csv.confirm":
                return {"fenced": False, "node": self.me, "epoch": self.epoch}, b""
            if op == "csv.vm":
                return await self.vms.handle(args), b""
            return {"error": "invalid-argument", "message": f"unknown volume request {op}"}, b""
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    async def _meta(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        op = str(args.get("op"))
        if op in FREEING_OPS and not self.synced.is_set():
            await self.synced.wait()
        assert self.service is not None
        inner = args.get("args")
        return await self.service.handle(peer, op, inner if isinstance(inner, dict) else {})

    async def _block_io(self, peer: str, args: dict[str, Any], payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
        rt = self.rt
        kind, offset, length = str(args["kind"]), int(args["offset"]), int(args["length"])
        if kind == "write" and len(payload) != length:
            return {"error": "invalid-argument",
                    "message": f"a block write of {length} bytes came with {len(payload)} bytes of data"}, b""
        failed_key = int(args.get("key", 0))
        if peer != self.me and failed_key:
            # whatever the node sent on its failed path must not land after this request
            try:
                await self.preempt(peer, failed_key + 1)
            except PreemptFailed as err:
                return _not_coordinator(f"{err}; retry"), b""
        try:
            data: bytes | Piped = b""
            if kind == "read" and peer != self.me:
                # a large block is spliced from the target's socket to the peer's, no copy
                data = await rt.path.read_piped(offset, length)
            elif kind == "read":
                data = await rt.path.read(offset, length, copy=False)  # goes straight into the reply
            elif kind == "write":
                if isinstance(payload, Piped):  # spliced on from the peer's socket to the target's
                    await rt.path.write_piped(offset, payload)
                else:
                    await rt.path.write(offset, payload)
            elif kind == "zero":
                await rt.path.write_zeroes(offset, length)
            elif kind == "flush":
                await rt.path.flush()
            else:
                return {"error": "invalid-argument", "message": f"unknown block request {kind}"}, b""
        except PathFailed as err:
            return _not_coordinator(f"the coordinator {self.me} lost its storage path: {err}"), b""
        rt.counters.served_requests += 1
        rt.counters.served_bytes += length
        if isinstance(data, Piped):
            rt.counters.served_spliced += 1
        elif isinstance(payload, Piped):
            rt.counters.served_spliced_writes += 1
        return {}, data

    async def _file_io(self, args: dict[str, Any], payload: bytes) -> tuple[Any, bytes]:
        await self.vol_ready.wait()
        vol = self.vol
        if vol is None:
            return _not_coordinator("the volume is being repaired; retry"), b""
        kind, ino, offset, length = str(args["kind"]), int(args["ino"]), int(args["offset"]), int(args["length"])
        f = VolumeFile(vol, ino)

        def work() -> bytes:
            if kind == "read":
                return f.pread(offset, length)
            if kind == "write":
                # durable: a node may later be handed a map containing these units
                f.pwrite(offset, payload, durable=True)
            elif kind == "flush":
                f.flush()
            return b""

        try:
            data = await self.rt.run_blocking(work)
        except VolumeError as err:
            if isinstance(err, DeviceError) or vol.failure is not None:
                return _not_coordinator(f"the coordinator could not perform the request ({err}); retry"), b""
            return {"error": "io-error", "message": str(err)}, b""
        self.rt.counters.served_requests += 1
        self.rt.counters.served_bytes += length
        return {}, data
