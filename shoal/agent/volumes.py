"""One shared volume on one node: liveness, who is coordinator, the data path, NBD.

Every agent runs a :class:`VolumeRuntime` per declared volume::

    StoragePath (registered NBD connections to the LUN)
        ▲ direct                      ┌── csv.io (block requests) ──▶ coordinator
    BlockRouter ──── redirected ──────┤
        ▲                             └── csv.fio (file requests, maintenance mode)
    FileBackend (NBD export per file) ── MapCache ── csv.meta ──▶ coordinator
        ▲
    NBD server on <run_dir>/<node>-<volume>.nbd (local clients: QEMU, qemu-io)

    LivenessRenewer ── slot writes through the router (direct, or via the coordinator
                       when this node has no storage path: a path failure is not death)
    lease loop ────── every T/2: follow the coordinator lease, contend when the rules
                       allow (CoordinatorRole does the coordinator's part)

Node-side rules (the coordinator's are in :mod:`shoal.agent.coordinator_role`):

- Direct I/O only while the path is up, our own renewals are current (4T) and no
  redirect reason is set; otherwise block requests go to the coordinator.
- A path failure aborts what was queued on the path, switches the volume to
  ``redirected`` (reason ``no-disk-connectivity``), and a probe re-opens the path with a
  *new key* every T; the first success returns the volume to ``direct``.
- On a coordinator change every cached map is dropped (after the I/O using it
  finished) before the change is acknowledged: the new coordinator does not know who
  held what, and frees nothing until every node acknowledged (or was fenced).
- A node whose renewals lapsed for longer than 8T asks the coordinator whether it was
  fenced before it does any more direct I/O. Fenced: every request fails (its clients
  see errors, never silent writes) until it has rejoined with a new generation.
- Quorum: a node that sees fewer than half of the cluster's nodes (itself included)
  neither takes nor keeps the coordinator role (an isolated node cannot be the
  coordinator of the majority). With exactly half, the lease on disk decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shoal.coordinator.election import Election, Role
from shoal.coordinator.errors import MetadataError
from shoal.coordinator.maps import MapCache
from shoal.datapath.backend import FileExports
from shoal.datapath.device import LunDevice
from shoal.datapath.errors import Fenced, NoCoordinator, PathFailed, RedirectAgain
from shoal.datapath.lun import LunAddress, StoragePath, make_key
from shoal.datapath.router import BlockRouter
from shoal.datapath.states import Counters, Facts, Reason, StateLog, derive
from shoal.membership import NodeState
from shoal.nbd.backend import ReadDone
from shoal.nbd.client import ClientSettings, NBDClient
from shoal.nbd.errors import NBDError, NBDFenced
from shoal.nbd.server import NBDServer
from shoal.netft.errors import NetftError
from shoal.util.pipes import Piped
from shoal.volume.errors import DeviceError
from shoal.volume.layout import Superblock
from shoal.volume.lease import FREE, LeaseArea, LeaseTiming, LivenessRenewer, SlotWatcher
from shoal.volume.volume import read_superblock

if TYPE_CHECKING:
    from shoal.agent.agent import NodeAgent
    from shoal.agent.coordinator_role import CoordinatorRole
    from shoal.config.model import VolumeConfig

log = logging.getLogger("shoal.agent.volumes")
T_ = TypeVar("T_")

#: how long a request waits for a coordinator before it fails (DESIGN: I/O waits while
#: the role moves or storage is lost everywhere; not forever)
COORDINATOR_WAIT_S = 600.0
#: connections ("lanes") to a peer: block I/O spreads over IO_LANES of them, and
#: metadata, revocations and long requests (move, repair) each have their own, so no
#: kind of request queues behind another
IO_LANES = 8
META_LANE = IO_LANES + 1
REVOKE_LANE = IO_LANES + 2
LONG_LANE = IO_LANES + 3
#: VM requests between agents (migration steps, status)
VM_LANE = IO_LANES + 4
#: the liveness slot's I/O when it goes through the coordinator (redirected): on a
#: connection of its own, so a renewal never waits behind block I/O
LEASE_LANE = IO_LANES + 5


class GapAwareRenewer(LivenessRenewer):
    """A renewer that notices when its renewals lapsed past expiry (frozen, or cut off)."""

    lapsed = False

    def renew_once(self) -> bool:
        before = self.last_ok_start
        ok = super().renew_once()
        if ok and before is not None and self.last_ok_start is not None \
                and self.last_ok_start - before >= self.timing.expiry_s:
            self.lapsed = True
        return ok


class _PlainIO:
    """Unregistered reads before the node knows its generation (reads cannot harm)."""

    def __init__(self, client: NBDClient):
        self.client = client

    async def read(self, offset: int, length: int) -> bytes:
        return await self.client.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        raise DeviceError("read-only probe")

    async def write_zeroes(self, offset: int, length: int) -> None:
        raise DeviceError("read-only probe")

    async def write_durable(self, offset: int, data: bytes) -> None:
        raise DeviceError("read-only probe")

    async def flush(self) -> None:
        pass


class DirectIO:
    """Block I/O on the path's control connection only (the coordinator's metadata)."""

    def __init__(self, path: StoragePath):
        self.path = path

    async def read(self, offset: int, length: int) -> bytes:
        return await self.path.read(offset, length, control=True)

    async def write(self, offset: int, data: bytes) -> None:
        await self.path.write(offset, data, control=True)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.path.write_zeroes(offset, length, control=True)

    async def flush(self) -> None:
        await self.path.flush(control=True)

    async def write_durable(self, offset: int, data: bytes) -> None:
        if self.path.can_fua:
            await self.path.write(offset, data, fua=True, control=True)
        else:
            await self.path.write(offset, data, control=True)
            await self.path.flush(control=True)


class VolumeRuntime:
    def __init__(self, agent: NodeAgent, vcfg: VolumeConfig):
        self.agent = agent
        self.name = vcfg.name
        self.node = agent.name
        self.node_id = agent.me.id
        self.io_timeout_s = agent.cfg.timing.io_timeout_s
        self.timing = LeaseTiming(self.io_timeout_s)
        self.address = LunAddress.parse(vcfg.url_for(agent.name))
        self.path = StoragePath(self.address, self.node, io_timeout_s=self.io_timeout_s)
        self.counters = Counters()
        self.statelog = StateLog(self.name, self.node)
        self.reasons: set[Reason] = set()
        self.fenced = False
        self.rejoining = False
        #: key of the last registration whose path failed: the coordinator preempts it
        #: before it performs any of our block requests
        self.failed_key = 0
        self.coordinator: str | None = None
        self.coordinator_reachable = False
        self.epoch = 0
        self.maintenance = False
        self.path_reason = ""
        self.attempt = 1
        self._changed = asyncio.Event()
        self.router = BlockRouter(self.path, redirect=self._redirect, direct_allowed=self._direct_allowed,
                                  on_path_failed=self._path_failed, counters=self.counters,
                                  start_redirected_read=self._start_redirected_read)
        # liveness slot writes: direct whenever the path is up (a fenced node's key is
        # preempted, so the target refuses them), else through the coordinator on a lane
        # of their own; on the path's control connection, never behind data
        self.lease_router = BlockRouter(self.path, redirect=self._redirect_lease, direct_allowed=lambda: True,
                                        on_path_failed=self._path_failed, counters=Counters(), control=True)
        self.maps = MapCache(self._meta_call)
        self.exports = FileExports(self)
        self.executor = ThreadPoolExecutor(6, thread_name_prefix=f"vol-{self.name}")
        self.lease_executor = ThreadPoolExecutor(2, thread_name_prefix=f"lease-{self.name}")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sb: Superblock | None = None
        self.routed: LunDevice | None = None
        self.direct_dev: LunDevice | None = None
        self.lease_dev: LunDevice | None = None
        self.renewer: GapAwareRenewer | None = None
        self.election: Election | None = None
        self.role: CoordinatorRole | None = None
        self.nbd: NBDServer | None = None
        self._probing = False
        self._lane_calls = [0] * IO_LANES  # calls running on each block lane
        self._whois_at = 0.0
        self._watcher: SlotWatcher | None = None
        #: one way at a time into the coordinator role (contending, or a hand-over to us)
        self.role_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self.socket_path = Path(agent.cfg.run_dir) / f"{self.node}-{self.name}.nbd"

    # ---- helpers -------------------------------------------------------------------

    async def run_blocking(self, fn: Any) -> Any:
        assert self.loop is not None
        return await self.loop.run_in_executor(self.executor, fn)

    async def run_lease(self, fn: Any) -> Any:
        """Lease and liveness work (lease reads, slot judging, contending, the guard) on
        threads of its own, so volume work (a defrag, a burst of file requests) can
        never delay it."""
        assert self.loop is not None
        return await self.loop.run_in_executor(self.lease_executor, fn)

    @property
    def generation(self) -> int:
        return self.renewer.slot.generation if self.renewer else 0

    def node_name(self, node_id: int) -> str | None:
        for n in self.agent.cfg.nodes:
            if n.id == node_id:
                return n.name
        return None

    def node_id_of(self, name: str) -> int:
        return self.agent.cfg.node(name).id

    def is_coordinator(self) -> bool:
        return self.role is not None and self.role.serving

    def has_quorum(self) -> bool:
        nodes = self.agent.cfg.nodes
        seen = 1 + sum(1 for p in self.agent.peers if self.agent.membership.state(p.name) is NodeState.UP)
        return 2 * seen >= len(nodes)

    def refresh_state(self, why: str) -> None:
        facts = Facts(path_up=self.path.up, coordinator_known=self.coordinator is not None
                      and (self.coordinator_reachable or self.coordinator == self.node),
                      reasons=frozenset(self.reasons), fenced=self.fenced)
        self.statelog.update(derive(facts), why)
        self._changed.set()
        self._changed = asyncio.Event()

    def _direct_allowed(self) -> bool:
        r = self.renewer
        if self.rejoining:
            return True  # the new-generation slot write, on the path opened with the new key
        if self.reasons or self.fenced:
            return False
        # before the first renewal (joining) the slot write itself must go direct
        return r is None or r.last_ok_start is None or (r.valid() and not r.lapsed)

    # ---- start / stop ----------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        gen = await self._read_generation()
        if gen is not None:
            await self._open_path(make_key(gen, 1))
        self.refresh_state("agent started")
        if not self.path.up:
            self._start_probe()
            await self._wait_for_coordinator()
        await self._setup_leases()
        self._spawn(self._lease_loop())
        self.nbd = NBDServer(self.exports)
        await self.nbd.listen_unix(str(self.socket_path))
        log.warning("%s on %s: serving its files over NBD on %s (%s)", self.name, self.node,
                    self.socket_path, self.statelog.state.value)

    async def _read_generation(self) -> int | None:
        """Our slot's next generation, read on an unregistered connection; None if the
        LUN cannot be reached now."""
        settings = ClientSettings(connect_timeout_s=max(self.io_timeout_s, 1.0), request_timeout_s=self.io_timeout_s,
                                  reconnect_attempts=1)
        try:
            client = await NBDClient.connect((self.address.host, self.address.port), self.address.export, settings)
        except (NBDError, OSError) as err:
            self._note_path_down(f"cannot reach {self.address}: {err}")
            return None
        assert self.loop is not None
        dev = LunDevice(_PlainIO(client), self.loop, size=client.size, name=str(self.address),
                        timeout_s=4 * self.io_timeout_s)
        try:
            def read() -> int:
                sb, _ = read_superblock(dev)
                self.sb = sb
                return LeaseArea(dev, sb).read_slot(self.node_id).generation + 1

            return int(await self.run_blocking(read))
        except DeviceError as err:
            self._note_path_down(str(err))
            return None
        finally:
            client.abort("probe done")

    def _note_path_down(self, why: str) -> None:
        self.path_reason = why
        self.reasons.discard(Reason.NO_DISK_CONNECTIVITY)  # path state is its own fact
        log.warning("%s on %s: no storage path: %s", self.name, self.node, why)

    async def _open_path(self, key: int) -> bool:
        try:
            await self.path.open(key)
        except PathFailed as err:
            if isinstance(err.__cause__, NBDFenced):
                await self._fenced(f"the storage target refused key {key:#x}: {err.__cause__}")
            self.path_reason = str(err)
            return False
        self.path_reason = ""
        return True

    async def _setup_leases(self) -> None:
        assert self.loop is not None
        if self.sb is None:
            probe = LunDevice(self.router, self.loop, size=0, name=f"{self.name} (routed)",
                              timeout_s=COORDINATOR_WAIT_S)
            self.sb = (await self.run_blocking(lambda: read_superblock(probe)))[0]
        sb = self.sb
        self.routed = LunDevice(self.router, self.loop, size=sb.volume_size, name=f"{self.name} (routed)",
                                timeout_s=COORDINATOR_WAIT_S)
        # bounded by 2T so a renewal never hangs the renewer
        self.lease_dev = lease_dev = LunDevice(self.lease_router, self.loop, size=sb.volume_size, name=f"{self.name} (lease)",
                              timeout_s=2 * self.io_timeout_s)
        self.direct_dev = LunDevice(DirectIO(self.path), self.loop, size=sb.volume_size, name=str(self.address),
                                    timeout_s=4 * self.io_timeout_s)
        self.renewer = GapAwareRenewer(LeaseArea(lease_dev, sb), self.node_id, cluster=self.agent.cfg.name,
                                       host=self.node, timing=self.timing)
        await self.run_blocking(self.renewer.start)
        self.election = Election(LeaseArea(self.direct_dev, sb), self.renewer, cluster=self.agent.cfg.name,
                                 on_change=self._on_role_change)

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.nbd is not None:
            await self.nbd.close()
        if self.role is not None:
            await self.role.step_down("the agent is stopping", release=True)
        if self.renewer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.run_blocking(lambda: self.renewer.stop(release=True)),
                                       4 * self.io_timeout_s)
        await self.path.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.lease_executor.shutdown(wait=False, cancel_futures=True)

    def _on_role_change(self, old: Role, new: Role, why: str) -> None:
        if self.loop is not None:
            fields = {"volume": self.name, "old": old.value, "new": new.value, "why": why}
            self.loop.call_soon_threadsafe(lambda: self.agent.event("coordinator-role", **fields))

    # ---- the storage path ------------------------------------------------------------

    def _path_failed(self, reason: str) -> None:
        self.failed_key = max(self.failed_key, self.path.key)
        self.path_reason = reason
        self.refresh_state(f"storage path failed: {reason}")
        self.agent.event("path", volume=self.name, state="failed", reason=reason)
        self._start_probe()

    def _start_probe(self) -> None:
        if not self._probing:
            self._probing = True
            self._spawn(self._probe_loop())

    async def _probe_loop(self) -> None:
        """Re-open the path with a new key every T until it works; then direct again."""
        try:
            while not self.path.up:
                await asyncio.sleep(self.io_timeout_s)
                if self.fenced or self.renewer is None:
                    continue
                self.attempt += 1
                if await self._open_path(make_key(self.generation, self.attempt)):
                    try:  # prove it: one read of the superblock within the I/O timeout
                        await self.path.read(0, 4096, control=True)
                    except PathFailed:
                        continue
                    self.refresh_state("storage path works again")
                    self.agent.event("path", volume=self.name, state="restored")
        finally:
            self._probing = False

    # ---- coordinator discovery -------------------------------------------------------

    def set_coordinator(self, node: str | None, epoch: int, why: str, *, reachable: bool = True) -> bool:
        """Record who is coordinator; True when it changed (maps must then be dropped)."""
        changed = (node, epoch) != (self.coordinator, self.epoch) and node is not None
        if node is not None and epoch >= self.epoch:
            self.coordinator, self.epoch = node, epoch
            self.coordinator_reachable = reachable
        elif node is None:
            self.coordinator = None
        self.refresh_state(why)
        return changed

    async def _wait_for_coordinator(self) -> str:
        deadline = time.monotonic() + COORDINATOR_WAIT_S
        while True:
            if self.fenced:
                raise Fenced(f"node {self.node} was fenced on volume {self.name}; it is rejoining")
            if self.is_coordinator():
                return self.node
            if self.coordinator is not None and (self.coordinator != self.node or self.is_coordinator()):
                return self.coordinator
            if self.coordinator is None or not self.path.up:
                await self._ask_peers_for_coordinator()
                if self.coordinator is not None and self.coordinator != self.node:
                    return self.coordinator
            if time.monotonic() > deadline:
                raise NoCoordinator(f"no coordinator of {self.name} answered for {COORDINATOR_WAIT_S:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.io_timeout_s / 2):
                    await self._changed.wait()

    async def _ask_peers_for_coordinator(self) -> None:
        async def one(peer: str) -> tuple[str, int] | None:
            try:
                async with asyncio.timeout(self.io_timeout_s):
                    res, _, _ = await self.agent.call_peer(peer, "csv.whois", {"volume": self.name})
                if isinstance(res, dict) and res.get("serving"):
                    return str(res["node"]), int(res["epoch"])
            except (NetftError, TimeoutError, ValueError, KeyError):
                pass
            return None

        answers = await asyncio.gather(*(one(p.name) for p in self.agent.peers
                                         if self.agent.membership.state(p.name) is NodeState.UP))
        best = max((a for a in answers if a), key=lambda a: a[1], default=None)
        if best is not None and best[1] >= self.epoch:
            if self.set_coordinator(best[0], best[1], f"{best[0]} says it is coordinator (epoch {best[1]})"):
                self._spawn(self.drop_maps())

    async def _judge_unreachable_peers(self, area: LeaseArea) -> None:
        """Feed disk liveness into membership: a peer whose slot advanced within the last
        3T (it renews every 2T) is alive on disk, so when no heartbeat reaches it, it is
        ``isolated``, not ``down``. Every peer is watched all the time, so a cut-off node
        goes straight from ``up`` to ``isolated``, and a dead one to ``down``."""
        if self._watcher is None:
            self._watcher = SlotWatcher(area, self.timing)
        watcher = self._watcher
        peers = [(p.name, p.id) for p in self.agent.peers]
        fresh_s = 3 * self.io_timeout_s
        try:
            judged = await self.run_lease(lambda: [(n, _poll_fresh(watcher, i, fresh_s)) for n, i in peers])
        except DeviceError:
            self._watcher = None  # judge nobody by time we could not see
            return
        for node, until in judged:
            self.agent.set_disk_alive(node, until)

    async def _serving(self, node: str) -> bool:
        """Does ``node`` say it serves the volume? (asked at most every T)"""
        now = time.monotonic()
        if self.coordinator_reachable and now - self._whois_at < self.io_timeout_s:
            return True
        self._whois_at = now
        try:
            async with asyncio.timeout(self.io_timeout_s):
                res, _, _ = await self.agent.call_peer(node, "csv.whois", {"volume": self.name})
            serving = isinstance(res, dict) and bool(res.get("serving"))
            if serving and bool(res.get("maintenance")) != self.maintenance:
                await self.enter_maintenance(bool(res.get("maintenance")), " (learned from the coordinator)")
        except (NetftError, TimeoutError):
            serving = False
        if serving != self.coordinator_reachable:
            self.coordinator_reachable = serving
            self.refresh_state(f"coordinator {node} {'answers' if serving else 'does not serve the volume'}")
        return serving

    def set_maintenance_flag(self, on: bool) -> None:
        self.maintenance = on
        if on:
            self.reasons.add(Reason.MAINTENANCE)
        else:
            self.reasons.discard(Reason.MAINTENANCE)

    async def enter_maintenance(self, on: bool, why: str) -> None:
        """Maintenance mode on or off here: drop every map either way (on: the
        coordinator may move extents; off: maps seen meanwhile may be stale)."""
        self.set_maintenance_flag(on)
        await self.drop_maps()
        self.refresh_state(f"maintenance mode {'on' if on else 'off'}{why}")

    async def drop_maps(self) -> None:
        """Drop every cached map, waiting for the I/O using it (coordinator change)."""
        await self.maps.drop_all()

    # ---- requests that need the coordinator ----------------------------------------------

    async def call_coordinator(self, op: str, args: dict[str, Any], payload: bytes = b"", *,
                               lane: int | None = None) -> tuple[Any, bytes]:
        """Send ``op`` to the coordinator, waiting (``paused``) while there is none; on
        ``lane``, or the one :meth:`_lane` picks."""
        args = {**args, "volume": self.name, "gen": self.generation}
        while True:
            coord = await self._wait_for_coordinator()
            if coord == self.node:
                assert self.role is not None
                result, answer = await self.role.handle(self.node, op, args, payload)
                assert not isinstance(answer, Piped), "only another node's reads are piped"
                data = answer
            else:
                on = self._lane(op) if lane is None else lane
                try:
                    result, data, _ = await self.agent.call_peer(coord, op, args, payload, lane=on)
                except NetftError as err:
                    if self.coordinator == coord:
                        self.coordinator_reachable = False
                        self.refresh_state(f"coordinator {coord} does not answer: {err}")
                    await asyncio.sleep(self.io_timeout_s / 4)
                    continue
                finally:
                    if lane is None and on <= IO_LANES:
                        self._lane_calls[on - 1] -= 1
            if isinstance(result, dict) and result.get("error") == "fenced":
                await self._fenced(str(result.get("message")))
                raise Fenced(str(result.get("message")))
            if isinstance(result, dict) and result.get("error") == "not-coordinator":
                if self.coordinator == coord and coord != self.node:
                    self.coordinator = None
                    self.refresh_state(f"{coord} is no longer coordinator")
                await asyncio.sleep(self.io_timeout_s / 10)
                continue
            if not self.coordinator_reachable:
                self.coordinator_reachable = True
                self.refresh_state(f"coordinator {coord} answers again")
            return result, data

    def _lane(self, op: str) -> int:
        """Block I/O goes on the least busy of IO_LANES connections (each carries one
        call at a time); metadata has its own. A block lane taken here is given back
        by the caller (``_lane_calls``)."""
        if op in ("csv.io", "csv.fio"):
            calls = self._lane_calls
            i = calls.index(min(calls))
            calls[i] += 1
            return 1 + i
        return META_LANE

    async def _meta_call(self, op: str, args: dict[str, Any]) -> Any:
        result, _ = await self.call_coordinator("csv.meta", {"op": op, "args": args})
        return result

    async def _redirect(self, kind: str, offset: int, length: int, payload: bytes, lane: int | None = None) -> bytes:
        result, data = await self.call_coordinator(
            "csv.io", {"kind": kind, "offset": offset, "length": length, "key": self.failed_key}, payload, lane=lane)
        if isinstance(result, dict) and "error" in result:
            raise MetadataError(str(result.get("message")), code=str(result["error"]))
        return data

    async def _redirect_lease(self, kind: str, offset: int, length: int, payload: bytes) -> bytes:
        """The liveness slot's I/O through the coordinator, on its own lane."""
        return await self._redirect(kind, offset, length, payload, lane=LEASE_LANE)

    def _start_redirected_read(self, offset: int, length: int, done: ReadDone) -> bool:
        """A redirected read sent now, from a callback (no task): when the coordinator is
        another node that answers, and the lane :meth:`_lane` picks is open and carries
        no call. ``done`` gets the data, or RedirectAgain for anything else (an error, a
        refusal, no answer): the caller reads again the long way, which knows how to
        wait, retry and be fenced. False, having sent nothing, when it cannot go now."""
        coord = self.coordinator
        if self.fenced or coord is None or coord == self.node or not self.coordinator_reachable:
            return False
        lane = self._lane("csv.io")  # taken: given back below, or when the answer comes
        conn = self.agent.open_lane(coord, lane)

        def answered(result: Any, data: bytes | None, err: BaseException | None) -> None:
            self._lane_calls[lane - 1] -= 1
            if err is None and isinstance(result, dict) and "error" not in result and data is not None \
                    and len(data) == length:
                done(data, None)
            else:
                done(None, RedirectAgain(f"redirected read at {offset}: {err or result}"))

        args = {"kind": "read", "offset": offset, "length": length, "key": self.failed_key,
                "volume": self.name, "gen": self.generation}
        if conn is not None and conn.start_call("csv.io", args, answered, self.agent.cfg.timing.rpc_call_timeout_s):
            return True
        self._lane_calls[lane - 1] -= 1
        return False

    # ---- the backend's view (datapath.backend.VolumeAccess) -------------------------------

    async def ready(self) -> None:
        if self.fenced:
            raise Fenced(f"node {self.node} was fenced on volume {self.name}: its liveness lease expired; "
                         "it refuses I/O until it has rejoined")
        r = self.renewer
        if r is not None and r.lapsed:
            await self._confirm_after_lapse()

    def ready_now(self) -> bool:
        r = self.renewer
        return not self.fenced and (r is None or not r.lapsed)

    def file_level(self) -> bool:
        return Reason.MAINTENANCE in self.reasons

    async def file_io(self, kind: str, ino: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        result, data = await self.call_coordinator(
            "csv.fio", {"kind": kind, "ino": ino, "offset": offset, "length": length}, payload)
        if isinstance(result, dict) and "error" in result:
            raise MetadataError(str(result.get("message")), code=str(result["error"]))
        self.counters.redirected_requests += 1
        self.counters.redirected_bytes += length
        return data

    # ---- fencing, seen from the fenced node ------------------------------------------------

    async def _confirm_after_lapse(self) -> None:
        """Our renewals lapsed past expiry: ask the coordinator whether we were fenced."""
        r = self.renewer
        assert r is not None
        result, _ = await self.call_coordinator("csv.confirm", {})
        if isinstance(result, dict) and result.get("fenced"):
            await self._fenced("the coordinator fenced us while our lease had expired")
            raise Fenced(f"node {self.node} was fenced on volume {self.name}; its clients' requests fail "
                         "until it has rejoined")
        r.lapsed = False
        log.warning("%s on %s: our renewals had lapsed, but the coordinator had not fenced us; continuing",
                    self.name, self.node)

    async def _fenced(self, why: str) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.path.abort("fenced")
        self.refresh_state(f"fenced: {why}")
        self.agent.event("fenced", volume=self.name, why=why)
        self._spawn(self._rejoin())

    async def _rejoin(self) -> None:
        """Leave the fenced state with a new liveness generation (and a new path key)."""
        r = self.renewer
        assert r is not None
        await asyncio.sleep(self.io_timeout_s)  # the clients' queued requests fail meanwhile
        await self.maps.drop_all()
        while True:
            new_gen = r.slot.generation + 1
            self.attempt = 1
            if not await self._open_path(make_key(new_gen, 1)):
                await asyncio.sleep(self.io_timeout_s)  # rejoining needs our own path
                continue
            self.rejoining = True
            try:
                r.lapsed = False
                await self.run_blocking(r.join)
                break
            except Exception as err:  # noqa: BLE001 - keep trying; the state says why
                log.warning("%s on %s: rejoin failed: %s", self.name, self.node, err)
                await asyncio.sleep(self.io_timeout_s)
            finally:
                self.rejoining = False
        self.fenced = False
        self.refresh_state(f"rejoined with generation {r.slot.generation}")
        if not self.path.up:
            self._start_probe()

    # ---- the lease loop --------------------------------------------------------------

    async def _lease_loop(self) -> None:
        from shoal.agent.coordinator_role import CoordinatorRole

        while True:
            try:
                if self.role is not None and self.role.serving:
                    await self.role.tick()
                elif not self.fenced:
                    await self._follow_or_contend(CoordinatorRole)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s on %s: lease step failed", self.name, self.node)
            await asyncio.sleep(self.io_timeout_s / 2)

    async def _follow_or_contend(self, role_cls: type[CoordinatorRole]) -> None:
        assert self.election is not None and self.lease_dev is not None and self.sb is not None
        area = LeaseArea(self.lease_dev, self.sb)
        try:
            lease = await self.run_lease(area.read_lease)
        except DeviceError:
            return
        await self._judge_unreachable_peers(area)
        owner = self.node_name(lease.owner) if lease.owner not in (FREE,) else None
        if owner is not None and owner != self.node:
            if (owner, lease.epoch) != (self.coordinator, self.epoch):
                if self.set_coordinator(owner, lease.epoch, f"the lease names {owner} (epoch {lease.epoch})",
                                        reachable=False):
                    self._spawn(self.drop_maps())
            if self.agent.membership.state(owner) is NodeState.UP and await self._serving(owner):
                return  # a live coordinator answers us: nothing to contend for
        r = self.renewer
        if not (self.path.up and not self.fenced and r is not None and r.valid() and self.has_quorum()):
            return
        election = self.election
        async with self.role_lock:  # never contend while a hand-over to us runs
            if election.role is Role.COORDINATOR or self.role is not None:
                return
            try:
                won = await self.run_lease(lambda: election.acquire(deadline_s=self.io_timeout_s))
            except DeviceError as err:
                log.info("%s on %s: contending failed: %s", self.name, self.node, err)
                return
            if won:
                self.role = role_cls(self)
                await self.role.become(previous=lease)


def _poll_fresh(watcher: SlotWatcher, node_id: int, within_s: float) -> float:
    """Read a peer's slot now; until when it counts as advancing (SlotWatcher.fresh_until)."""
    watcher.poll(node_id)
    return watcher.fresh_until(node_id, within_s)
