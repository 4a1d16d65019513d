"""The VM records of one volume, kept by that volume's coordinator (``csv.vm``).

Every change is a compare-and-set on the record's ``gen``: the caller says which
generation it read, and the change is refused (``conflict``, with the current record)
if anybody changed it since. One coordinator serialises them under one lock and writes
each to the volume before it answers, so a record read back is the record written, and
two nodes can never both be told they own a VM. The on-disk form is in
``shoal.vm.record``.

The coordinator also runs failover here (``failover_step``): a VM whose owner is
``down`` *and* fenced at the storage target (its liveness generation preempted) is
given to the best surviving node. Isolated owners (alive on disk) keep their VMs.

Requests (``args["vop"]``), answers are dicts; errors are ``{"error", "message"}``:

    list                              {"records": [...], "paused": [...]}
    get      name                     {"record": ...}
    create   record                   {"record": ...}         error "exists"
    update   name, vm_gen, changes    {"record": ...}         error "conflict" (+ "record")
    delete   name, vm_gen             {}
    nodes    [set: {node: paused}]    {"paused": [...]}
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shoal.errors import ShoalError
from shoal.membership import NodeState
from shoal.vm.placement import choose_node
from shoal.vm.record import (
    NODES_FILE,
    RECORD_DIR,
    RECORD_FILE_SIZE,
    RecordCorrupt,
    VMRecord,
    decode_file,
    encode_slot,
    record_path,
    slot_offset,
)
from shoal.volume.errors import VolumeError
from shoal.volume.lease import LeaseArea

if TYPE_CHECKING:
    from shoal.agent.coordinator_role import CoordinatorRole
    from shoal.volume.volume import Volume

log = logging.getLogger(__name__)

#: record fields a caller may change with ``update``
MUTABLE = {"owner", "desired", "migration", "last_migration", "note", "spec"}


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, **extra}


class VMRegistry:
    def __init__(self, role: CoordinatorRole):
        self.role = role
        self.records: dict[str, tuple[int, VMRecord]] = {}  # name -> (seq on disk, record)
        self.paused: dict[str, bool] = {}
        self._nodes_seq = 0
        self._loaded = False
        self._lock = asyncio.Lock()
        self._failover_busy = False

    @property
    def rt(self) -> Any:
        return self.role.rt

    # ---- storage -----------------------------------------------------------------------

    def _vol(self) -> Volume:
        vol = self.role.vol
        if vol is None:
            raise VolumeError("the volume is not open on the coordinator now")
        return vol

    def _read_all(self) -> tuple[dict[str, tuple[int, VMRecord]], tuple[int, dict[str, bool]]]:
        vol = self._vol()
        records: dict[str, tuple[int, VMRecord]] = {}
        if vol.exists(RECORD_DIR):
            for st in vol.listdir(RECORD_DIR):
                path = st.path if st.path.startswith("/") else f"{RECORD_DIR}/{st.path}"
                if st.kind != "file" or not path.endswith(".vm"):
                    continue
                try:
                    seq, obj = decode_file(vol.open_file(path).pread(0, RECORD_FILE_SIZE))
                    rec = VMRecord.from_dict(obj)
                except (RecordCorrupt, KeyError, TypeError, ValueError) as err:
                    log.error("%s: VM record %s is unreadable (%s); it is left alone", self.rt.name, path, err)
                    continue
                records[rec.name] = (seq, rec)
        nodes: tuple[int, dict[str, bool]] = (0, {})
        if vol.exists(NODES_FILE):
            try:
                seq, obj = decode_file(vol.open_file(NODES_FILE).pread(0, RECORD_FILE_SIZE))
                nodes = (seq, {str(k): bool(v) for k, v in obj.get("paused", {}).items()})
            except RecordCorrupt as err:
                log.error("%s: %s is unreadable (%s); no node is paused", self.rt.name, NODES_FILE, err)
        return records, nodes

    def _write(self, path: str, seq: int, obj: dict[str, Any]) -> None:
        """Write slot ``seq % 2`` of a record file, durably (the file is made if new)."""
        vol = self._vol()
        if not vol.exists(path):
            if not vol.exists(RECORD_DIR):
                vol.mkdir(RECORD_DIR, parents=True)
            f = vol.create(path, RECORD_FILE_SIZE, preallocate=True)
        else:
            f = vol.open_file(path)
        f.pwrite(slot_offset(seq), encode_slot(seq, obj), durable=True, sync=True)  # on disk before we answer

    async def _load(self) -> None:
        if not self._loaded:
            records, (nseq, paused) = await self.rt.run_blocking(self._read_all)
            self.records, self._nodes_seq, self.paused = records, nseq, paused
            self._loaded = True

    async def _store(self, rec: VMRecord) -> None:
        seq = self.records[rec.name][0] + 1 if rec.name in self.records else 1
        await self.rt.run_blocking(lambda: self._write(record_path(rec.name), seq, rec.to_dict()))
        self.records[rec.name] = (seq, rec)

    # ---- requests ----------------------------------------------------------------------

    async def handle(self, args: dict[str, Any]) -> dict[str, Any]:
        vop = str(args.get("vop"))
        async with self._lock:
            try:
                await self._load()
                return await self._dispatch(vop, args)
            except ShoalError as err:
                if not isinstance(err, VolumeError):  # a record that cannot be stored (too big, bad)
                    return _error("invalid-argument", str(err))
                return _error("not-coordinator", f"the coordinator could not read or write VM records ({err}); "
                              "retry")

    async def _dispatch(self, vop: str, args: dict[str, Any]) -> dict[str, Any]:
        if vop == "list":
            return {"records": [r.to_dict() for _, r in self.records.values()],
                    "paused": sorted(n for n, p in self.paused.items() if p)}
        if vop == "nodes":
            if isinstance(args.get("set"), dict):
                paused = {**self.paused, **{str(k): bool(v) for k, v in args["set"].items()}}
                seq = self._nodes_seq + 1
                await self.rt.run_blocking(lambda: self._write(NODES_FILE, seq, {"paused": paused}))
                self.paused, self._nodes_seq = paused, seq
            return {"paused": sorted(n for n, p in self.paused.items() if p)}
        name = str(args.get("name") or (args.get("record") or {}).get("spec", {}).get("name", ""))
        current = self.records.get(name, (0, None))[1]
        if vop == "get":
            if current is None:
                return _error("not-found", f"there is no VM named {name!r} on volume {self.rt.name}.")
            return {"record": current.to_dict()}
        if vop == "create":
            if current is not None:
                return _error("exists", f"a VM named {name!r} already exists; pick another name or delete it "
                              "first ('shoal vm delete').")
            rec = VMRecord.from_dict(args["record"])
            await self._store(rec)
            return {"record": rec.to_dict()}
        if current is None:
            return _error("not-found", f"there is no VM named {name!r} on volume {self.rt.name}.")
        if int(args.get("vm_gen", -1)) != current.gen:
            return _error("conflict", f"VM {name} changed meanwhile (generation {current.gen}, not "
                          f"{args.get('vm_gen')}); read it again", record=current.to_dict())
        if vop == "delete":
            await self.rt.run_blocking(lambda: self._vol().remove(record_path(name)))
            del self.records[name]
            return {}
        if vop == "update":
            changes = {k: v for k, v in dict(args.get("changes") or {}).items() if k in MUTABLE}
            if "spec" in changes:
                changes["spec"] = type(current.spec).from_dict(changes["spec"])
            rec = current.changed(t=time.time(), **changes)
            await self._store(rec)
            return {"record": rec.to_dict()}
        return _error("invalid-argument", f"unknown VM request {vop!r}")

    # ---- failover ----------------------------------------------------------------------

    def start_failover_step(self) -> None:
        """From the coordinator's lease loop: run a failover step beside it, never in it
        (a record write may wait on the volume; the lease loop must not wait with it)."""
        if not self._failover_busy:
            self._failover_busy = True
            self.rt.agent._spawn(self._failover_once())

    async def _failover_once(self) -> None:
        try:
            await self.failover_step()
        finally:
            self._failover_busy = False

    async def failover_step(self) -> None:
        """Give every VM of a dead and fenced node to a survivor (see the module doc)."""
        if not self.role.synced.is_set() or self.role.vol is None:
            return
        async with self._lock:
            try:
                await self._load()
            except VolumeError:
                return
            orphans = [r for _, r in self.records.values()
                       if r.desired == "running" and r.owner and r.owner != self.role.me]
            if not orphans:
                return
            membership = self.rt.agent.membership
            up = [self.role.me] + [p.name for p in self.rt.agent.peers if membership.state(p.name) is NodeState.UP]
            candidates = [n for n in up if not self.paused.get(n)]
            for owner in sorted({str(r.owner) for r in orphans}):
                if membership.state(owner) is not NodeState.DOWN or not await self._fenced_now(owner):
                    continue
                for rec in [r for r in orphans if r.owner == owner]:
                    await self._fail_over(rec, candidates)

    async def _fenced_now(self, node: str) -> bool:
        """True when every registration of the node's current liveness generation is
        preempted at the storage target: fenced (``fence``), or preempted whole as the
        previous coordinator when this one took over."""
        fenced = self.role.fenced_gen.get(node, -1)
        preempted = self.role.preempted.get(node, 0)
        whole = (preempted >> 32) - 1  # keys below (g << 32 | a) cover every generation below g
        if max(fenced, whole) < 0:
            return False
        area = LeaseArea(self.rt.direct_dev, self.rt.sb)
        try:
            slot = await self.rt.run_lease(lambda: area.read_slot(self.rt.node_id_of(node)))
        except VolumeError:
            return False
        return bool(slot.generation <= max(fenced, whole))

    async def _fail_over(self, rec: VMRecord, candidates: list[str]) -> None:
        load: dict[str, int] = {}
        for _, r in self.records.values():
            if r.owner and r.desired == "running":
                load[r.owner] = load.get(r.owner, 0) + 1
        target = choose_node(rec.spec.preferred_owners, candidates, load)
        if target is None:
            log.error("%s: VM %s lost its node %s and no node can take it", self.rt.name, rec.name, rec.owner)
            return
        note = f"failover: {rec.owner} is down and fenced; {target} runs it now"
        new = rec.changed(t=time.time(), owner=target, note=note, migration=None)
        await self._store(new)
        log.warning("%s: VM %s: %s", self.rt.name, rec.name, note)
        self.rt.agent.event("vm", vm=rec.name, action="failover", from_node=rec.owner, to=target)
        self.rt._spawn(self.rt.agent.vms.kick(target))
