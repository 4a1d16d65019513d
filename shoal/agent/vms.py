"""The VMs of one node: which run here, starting and stopping them, and keeping them true
to the cluster's records.

The record (``shoal.vm.record``, kept by the coordinator of the VM's volume) says who
owns a VM and whether it should run; this module makes the node match it. One
reconcile step, every second and whenever a peer kicks us:

- a VM we own that should run and does not run here is started;
- a VM running here that we do not own (any more), or that should not run, is killed —
  the record is the only authority, so a node that was fenced and whose VMs were
  restarted elsewhere ends its stale copies as soon as it can read the records again;
- a VM whose QEMU exited by itself is marked stopped, with the reason.

VMs with a migration or a start under way (``busy``) are left to that operation.

Never two running instances: a node starts a VM only when the record names it owner,
and the record changes owner only (a) at a migration's commit point, while the source
is stopped, or (b) at failover, after the old owner is down *and* fenced at the storage
target. A node that notices it was stopped (frozen) for longer than the time after
which others may fence it pauses every VM at once, before anything else, and lets each
run again only after the records say it is still the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.agent.errors import AgentError
from shoal.membership import NodeState
from shoal.netft.errors import NetftError
from shoal.vm.errors import GuestError, VMError
from shoal.vm.placement import choose_node
from shoal.vm.record import VMRecord, VMSpec

if TYPE_CHECKING:
    from shoal.agent.agent import NodeAgent
    from shoal.vm.qemu import Qemu

log = logging.getLogger(__name__)

RECONCILE_S = 1.0
#: how long a registry read may wait for a coordinator before a reconcile step skips it
REGISTRY_WAIT_S = 3.0
#: how long a request from the CLI waits for a volume's coordinator
CALL_WAIT_S = 30.0
#: an incoming migration not committed after this long is dropped (its source is gone)
PENDING_MAX_S = 900.0
#: an incoming QEMU may wait this long for its record's mark (written beside its start)
PENDING_UNMARKED_S = 5.0
#: how often the freeze watchdog looks at the clock
WATCHDOG_S = 0.1
#: how long ``vm stop`` waits for a guest to power off before it ends QEMU
POWERDOWN_WAIT_S = 30.0
#: where the accelerator probe's answer is kept, for every agent of this host until reboot
ACCEL_CACHE = "/run/shoal/accel.json"
#: how long the Linux test guest gets to reach its init under KVM before TCG is chosen
ACCEL_PROBE_S = 20.0
#: live migrations a node takes part in at once (outgoing or incoming); more wait
MAX_PARALLEL_MIGRATIONS = 2


@dataclass
class Instance:
    """A QEMU process of this node running (or receiving) one VM."""

    name: str
    qemu: Qemu
    origin: str
    started_wall: float
    started_mono: float
    console: Path
    volume: str
    stopping: bool = False
    #: when this node last became its owner (monotonic): records read before that are stale
    owned_since: float = 0.0

    def view(self, status: str) -> dict[str, Any]:
        return {"name": self.name, "status": status, "pid": self.qemu.pid,
                "uptime_s": round(time.monotonic() - self.started_mono, 1), "origin": self.origin,
                "console": str(self.console)}


class RegistryError(AgentError):
    """A VM record request was refused (``code`` says why)."""

    def __init__(self, message: str, code: str, record: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.record = record


class VMManager:
    def __init__(self, agent: NodeAgent):
        self.agent = agent
        self.local: dict[str, Instance] = {}
        #: incoming migrations not committed yet
        self.pending: dict[str, Instance] = {}
        self.busy: set[str] = set()
        self.accel = "tcg"
        self.accel_reason = "not probed yet"
        self._accel_ready = asyncio.Event()
        self._wake = asyncio.Event()
        self.migration_slots = asyncio.Semaphore(MAX_PARALLEL_MIGRATIONS)
        self.migrations_running = 0
        self.dir = Path(agent.cfg.run_dir) / f"{agent.name}-vms"
        self._suspect = False
        self._suspect_since = 0.0
        #: nodes paused (drained), as of the last reconcile step
        self.paused_nodes: set[str] = set()
        #: every record, as of the last reconcile step (a hint: decisions re-read or CAS)
        self.cached: dict[str, VMRecord] = {}

    @property
    def me(self) -> str:
        return self.agent.name

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent._spawn(self._probe_accel())
        self.agent._spawn(self._watchdog())
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: VM reconcile step failed", self.me)

    async def _watchdog(self) -> None:
        """Notice that this process was stopped (frozen) for longer than others wait
        before they fence it: pause every VM at once, before anything else runs."""
        frozen_after = 8 * self.agent.cfg.timing.io_timeout_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_S)
            now = time.monotonic()
            if now - last > frozen_after and (self.local or self.pending):
                await self._pause_all(f"this node was stopped for {now - last:.1f} s; others may have fenced it")
            last = now

    async def _probe_accel(self) -> None:
        """KVM only if the Linux test guest really boots under it (see shoal.vm.accel)."""
        try:
            from shoal.vm.accel import probe_accel
            from shoal.vm.guests.paths import locate

            try:
                g = locate("disk")
                kernel, initrd, append = Path(g.kernel), Path(g.initrd) if g.initrd else None, g.append
            except GuestError:
                kernel, initrd, append = None, None, None
            cache = Path(os.environ.get("SHOAL_ACCEL_CACHE", ACCEL_CACHE))
            cache.parent.mkdir(parents=True, exist_ok=True)
            choice = await probe_accel(kernel, b"shoal-disk ", ACCEL_PROBE_S, initrd=initrd, append=append,
                                       cache=cache)
            self.accel, self.accel_reason = choice.accel, choice.reason
        except Exception as err:  # noqa: BLE001 - TCG always works; say why we fell back
            self.accel, self.accel_reason = "tcg", f"the KVM probe failed: {err}"
        log.warning("%s: VMs run under %s: %s", self.me, self.accel.upper(), self.accel_reason)
        self.agent.event("vm", action="accel", accel=self.accel, reason=self.accel_reason)
        self._accel_ready.set()

    async def kick(self, node: str | None = None) -> None:
        """Make ``node`` (default: this one) reconcile now."""
        if node is None or node == self.me:
            self._wake.set()
            return
        with contextlib.suppress(NetftError, TimeoutError):
            await self.agent.call_peer(node, "vm.kick", {})

    async def stop(self) -> None:
        """The agent stops: its VMs stop with it (a restarted agent starts them again)."""
        for inst in list(self.local.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(inst.qemu.quit(), 10)
        self.local.clear()

    async def _pause_all(self, why: str) -> None:
        log.warning("%s: pausing every VM here: %s", self.me, why)
        self._suspect = True
        self._suspect_since = time.monotonic()
        for inst in list(self.local.values()):
            with contextlib.suppress(Exception):
                await inst.qemu.stop()
        self.agent.event("vm", action="pause-all", why=why)

    # ---- the registry --------------------------------------------------------------------

    def _runtime(self, volume: str) -> Any:
        rt = self.agent.volumes.get(volume)
        if rt is None:
            raise AgentError(f"volume {volume!r} is not declared in this cluster's configuration.")
        return rt

    async def registry(self, volume: str, vop: str, **args: Any) -> dict[str, Any]:
        """One ``csv.vm`` request to the coordinator of ``volume``; errors raise RegistryError."""
        rt = self._runtime(volume)
        result, _ = await rt.call_coordinator("csv.vm", {"vop": vop, **args})
        if isinstance(result, dict) and result.get("error"):
            raise RegistryError(str(result.get("message")), str(result["error"]), result.get("record"))
        return dict(result)

    async def get(self, volume: str, name: str, wait_s: float = CALL_WAIT_S) -> VMRecord:
        """The record of ``name`` on ``volume``, read now at its coordinator."""
        try:
            async with asyncio.timeout(wait_s):
                out = await self.registry(volume, "get", name=name)
        except TimeoutError as err:
            raise AgentError(f"no coordinator of volume {volume} answered within {wait_s:g} s; "
                             "retry when 'shoal volume ls' shows one.") from err
        return VMRecord.from_dict(out["record"])

    async def update(self, rec: VMRecord, **changes: Any) -> VMRecord:
        """Compare-and-set ``changes`` on ``rec`` (RegistryError "conflict" if it changed)."""
        if "spec" in changes and isinstance(changes["spec"], VMSpec):
            changes["spec"] = changes["spec"].to_dict()
        out = await self.registry(rec.spec.volume, "update", name=rec.name, vm_gen=rec.gen, changes=changes)
        return VMRecord.from_dict(out["record"])

    async def records(self, wait_s: float | None = REGISTRY_WAIT_S) -> tuple[dict[str, VMRecord], set[str], set[str]]:
        """(every VM record by name, the paused nodes, the volumes that answered)."""
        found: dict[str, VMRecord] = {}
        paused: set[str] = set()
        answered: set[str] = set()

        async def one(volume: str) -> None:
            try:
                async with asyncio.timeout(wait_s):
                    out = await self.registry(volume, "list")
            except (TimeoutError, AgentError, VMError, NetftError) as err:
                log.debug("%s: VM records of %s unavailable: %s", self.me, volume, err)
                return
            except Exception as err:  # fenced, or the volume is not started: not now
                log.debug("%s: VM records of %s unavailable: %s", self.me, volume, err)
                return
            answered.add(volume)
            for d in out["records"]:
                rec = VMRecord.from_dict(d)
                found[rec.name] = rec
            if volume == self.agent.cfg.volumes[0].name:
                paused.update(out.get("paused", []))

        await asyncio.gather(*(one(v.name) for v in self.agent.cfg.volumes))
        return found, paused, answered

    async def find(self, name: str) -> VMRecord:
        recs, _, answered = await self.records(wait_s=CALL_WAIT_S)
        if name not in recs:
            missing = [v.name for v in self.agent.cfg.volumes if v.name not in answered]
            extra = f" (volumes {', '.join(missing)} did not answer)" if missing else ""
            raise AgentError(f"there is no VM named {name!r}{extra}; 'shoal vm ls' lists them.")
        return recs[name]

    async def set_paused(self, node: str, paused: bool) -> list[str]:
        if not self.agent.cfg.volumes:
            raise AgentError("this cluster declares no shared volume, where node flags are kept; add one.")
        out = await self.registry(self.agent.cfg.volumes[0].name, "nodes", set={node: paused})
        return list(out["paused"])

    # ---- reconcile -----------------------------------------------------------------------

    async def reconcile(self) -> None:
        await self._reap()
        fetched_at = time.monotonic()
        recs, paused, answered = await self.records()
        if self.agent.cfg.volumes and self.agent.cfg.volumes[0].name in answered:
            self.paused_nodes = paused
        self.cached = {n: r for n, r in {**self.cached, **recs}.items()
                       if n in recs or (r.spec.volume not in answered)}
        for name, inst in list(self.local.items()):
            if name in self.busy or inst.stopping or inst.owned_since >= fetched_at:
                continue  # busy, or it became ours after these records were read
            rec = recs.get(name)
            if rec is None and inst.volume not in answered:
                continue  # its volume did not answer: we know nothing new
            if rec is None or rec.owner != self.me or rec.desired != "running":
                why = ("its record was deleted" if rec is None else
                       f"{rec.owner} owns it now" if rec.owner != self.me else "it should not run")
                await self._end(inst, f"stale instance ({why})", kill=True)
            elif self._suspect and self._records_trusted():
                with contextlib.suppress(Exception):
                    await inst.qemu.cont()
                log.warning("%s: VM %s is still ours after the freeze; running again", self.me, name)
        for name in list(self.pending):
            if self.pending[name].owned_since >= fetched_at:
                continue
            if time.monotonic() - self.pending[name].owned_since > PENDING_MAX_S:
                from shoal.agent.vm_migrate import abort

                await abort(self, {"name": name, "why": "no commit came; the source is gone"})
                continue
            rec = recs.get(name)
            mig = rec.migration if rec is not None else None
            young = time.monotonic() - self.pending[name].owned_since < PENDING_UNMARKED_S
            if (rec is not None or self.pending[name].volume in answered) and (mig or {}).get("to") != self.me \
                    and not young:
                from shoal.agent.vm_migrate import abort

                await abort(self, {"name": name, "why": "the record shows no migration to this node"})
        if self._suspect and self._records_trusted() and all(v.name in answered for v in self.agent.cfg.volumes):
            self._suspect = False
        for rec in recs.values():
            if rec.owner != self.me or rec.name in self.busy or rec.name in self.pending:
                continue
            if rec.migration is not None:
                # marked by this node, which is not moving it (its agent restarted): clear
                self.agent._spawn(self._clear_orphan_mark(rec))
            elif rec.desired == "running" and rec.name not in self.local:
                self.agent._spawn(self._start_guarded(rec, "reconcile"))

    def _records_trusted(self) -> bool:
        """After a freeze, records answered by this node's own coordinator role are
        trusted only once it had time to re-check its lease (and step down if lost)."""
        return time.monotonic() - self._suspect_since > 4 * self.agent.cfg.timing.io_timeout_s

    async def _reap(self) -> None:
        """Notice QEMUs that exited by themselves: the VM stops, with the reason."""
        for name, inst in list(self.local.items()):
            rc = inst.qemu.returncode
            if rc is None or inst.stopping or name in self.busy:
                continue
            del self.local[name]
            why = f"QEMU exited with status {rc} (the guest powered off, or QEMU failed; see 'shoal vm console {name}')"
            log.warning("%s: VM %s: %s", self.me, name, why)
            self.agent.event("vm", vm=name, action="exited", status=rc)
            self.agent._spawn(self._mark_exited(inst.volume, name, why))

    async def _mark_exited(self, volume: str, name: str, why: str) -> None:
        with contextlib.suppress(Exception):
            rec = await self.get(volume, name, CALL_WAIT_S)
            if rec.owner == self.me and rec.desired == "running" and name not in self.local:
                await self.update(rec, desired="stopped", note=why[:300])

    async def _clear_orphan_mark(self, rec: VMRecord) -> None:
        if rec.name in self.busy:
            return
        self.busy.add(rec.name)
        try:
            cur = await self.get(rec.spec.volume, rec.name, REGISTRY_WAIT_S)
            if cur.owner == self.me and cur.migration is not None and rec.name not in self.local:
                await self.update(cur, migration=None, note=f"a migration from {self.me} was interrupted "
                                  "(its agent restarted); the VM starts here again")
                log.warning("%s: VM %s: cleared an interrupted migration", self.me, rec.name)
        except Exception as err:  # noqa: BLE001 - the next step tries again
            log.info("%s: VM %s: clearing an interrupted migration failed: %s", self.me, rec.name, err)
        finally:
            self.busy.discard(rec.name)

    async def _start_guarded(self, rec: VMRecord, origin: str) -> None:
        if rec.name in self.busy or rec.name in self.local:
            return
        self.busy.add(rec.name)
        try:
            # the snapshot may be seconds old (a slow volume): start only on a fresh read
            rec = await self.get(rec.spec.volume, rec.name, REGISTRY_WAIT_S)
            if rec.owner != self.me or rec.desired != "running" or rec.migration is not None \
                    or rec.name in self.local:
                return
            await self.start_instance(rec, origin)
        except (AgentError, NetftError):
            pass  # the record could not be read: the next step tries again
        except VMError as err:
            log.error("%s: VM %s did not start: %s", self.me, rec.name, err)
            self.agent.event("vm", vm=rec.name, action="start-failed", error=str(err))
            with contextlib.suppress(Exception):
                cur = await self.get(rec.spec.volume, rec.name, REGISTRY_WAIT_S)
                if cur.owner == self.me:
                    await self.update(cur, desired="stopped", note=f"did not start on {self.me}: {err}"[:300])
        finally:
            self.busy.discard(rec.name)

    # ---- one instance --------------------------------------------------------------------

    def paths(self, name: str) -> tuple[Path, Path]:
        """(QMP socket, console log) of a VM on this node."""
        return self.dir / f"{name}.qmp", self.dir / f"{name}.log"

    async def machine(self, spec: VMSpec) -> Any:
        """The QEMU machine for ``spec`` on this node: its disks through this node's sockets."""
        from shoal.vm.guests.paths import locate
        from shoal.vm.qemu import DiskAttach, MachineSpec

        disks = []
        for i, d in enumerate(spec.disks):
            rt = self._runtime(d.volume)
            disks.append(DiskAttach(socket_path=str(rt.socket_path), export=d.export, node_name=f"disk{i}"))
        kernel, initrd, append = spec.kernel, spec.initrd, spec.append
        if spec.test_guest:
            g = locate(spec.test_guest)
            kernel = str(g.kernel)
            initrd = str(g.initrd) if g.initrd else None
            append = g.append if spec.test_guest == "disk" else f"rate={spec.dirty_rate_mib_s}"
        _, console = self.paths(spec.name)
        return MachineSpec(name=spec.name, memory_mib=spec.memory_mib, cpus=spec.cpus, cpu_model=spec.cpu_model,
                           disks=tuple(disks), kernel=kernel, initrd=initrd, append=append,
                           serial_log=str(console))

    async def new_qemu(self, spec: VMSpec, *, incoming: bool, origin: str) -> Instance:
        """Start QEMU for ``spec`` (paused and waiting for a migration when ``incoming``)."""
        from shoal.vm.qemu import Qemu

        await self._accel_ready.wait()
        machine = await self.machine(spec)
        qmp, console = self.paths(spec.name)
        qmp.unlink(missing_ok=True)
        with console.open("a") as f:  # the guest's serial output follows this line
            f.write(f"\n--- shoal: {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name} on {self.me}: {origin} ---\n")
        # a VM dies with its agent (like with its host): a restarted agent starts it again
        q = Qemu(machine, accel=self.accel, qmp_socket=str(qmp), incoming=incoming, start_paused=incoming,
                 stderr_log=str(self.dir / f"{spec.name}.qemu.log"), die_with_parent=True)
        await q.start()
        now = time.monotonic()
        return Instance(spec.name, q, origin, time.time(), now, console, spec.volume, owned_since=now)

    async def start_instance(self, rec: VMRecord, origin: str) -> Instance:
        inst = await self.new_qemu(rec.spec, incoming=False, origin=origin)
        self.local[rec.name] = inst
        log.warning("%s: VM %s started (%s, pid %s, %s)", self.me, rec.name, origin, inst.qemu.pid, self.accel)
        self.agent.event("vm", vm=rec.name, action="started", origin=origin, pid=inst.qemu.pid)
        return inst

    async def _end(self, inst: Instance, why: str, *, kill: bool) -> None:
        inst.stopping = True
        try:
            if kill:
                inst.qemu.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(inst.qemu.wait_exit(), 10)
            else:
                await inst.qemu.quit()
        finally:
            if self.local.get(inst.name) is inst:
                del self.local[inst.name]
        log.warning("%s: VM %s ended here: %s", self.me, inst.name, why)
        self.agent.event("vm", vm=inst.name, action="ended", why=why)

    async def stop_local(self, name: str, *, force: bool, test_guest: bool) -> str:
        inst = self.local.get(name)
        if inst is None:
            return "not running here"
        if name in self.busy and not force:
            raise AgentError(f"{name} is being moved or started on {self.me}; retry when that is done "
                             "(or use 'shoal vm kill').")
        if force or test_guest:
            # test guests ignore ACPI power-off; their writes are durable, so QEMU just quits
            await self._end(inst, "killed" if force else "stopped", kill=force)
            return "killed" if force else "stopped"
        inst.stopping = True
        with contextlib.suppress(Exception):
            await inst.qemu.execute("system_powerdown")
        try:
            await asyncio.wait_for(inst.qemu.wait_exit(), POWERDOWN_WAIT_S)
            how = "powered off by the guest"
        except TimeoutError:
            how = f"stopped (the guest did not power off within {POWERDOWN_WAIT_S:.0f} s)"
        await self._end(inst, how, kill=False)
        return how

    async def status(self) -> dict[str, Any]:
        out = {}
        for name, inst in self.local.items():
            try:
                st = await asyncio.wait_for(inst.qemu.status(), 5)
            except Exception as err:  # noqa: BLE001 - report, do not fail the listing
                st = f"unknown ({err})"
            out[name] = inst.view(str(st))
        return {"node": self.me, "accel": self.accel, "accel_reason": self.accel_reason, "vms": out,
                "migrations": self.migrations_running}

    # ---- placement -----------------------------------------------------------------------

    def candidates(self, paused: set[str], exclude: str | None = None) -> list[str]:
        m = self.agent.membership
        up = [self.me] + [p.name for p in self.agent.peers if m.state(p.name) is NodeState.UP]
        return [n for n in up if n not in paused and n != exclude]

    def place(self, rec: VMRecord, recs: dict[str, VMRecord], paused: set[str], exclude: str | None = None) -> str:
        load: dict[str, int] = {}
        for r in recs.values():
            if r.owner and r.desired == "running" and r.name != rec.name:
                load[r.owner] = load.get(r.owner, 0) + 1
        node = choose_node(rec.spec.preferred_owners, self.candidates(paused, exclude), load)
        if node is None:
            raise AgentError(f"no node can take VM {rec.name}: every other node is down or paused.")
        return node

