"""Moving a running VM between nodes: live and quick migration, and drain.

A migration is two-sided (source and destination agents) with one commit point:

    source                                   destination
    ------                                   -----------
                ─── vm.incoming ───────────▶ pre-flight: memory, CPU, accelerator, disks,
    at the same time:                        guest files; then QEMU -incoming defer -S,
    record: migration = {to, mode, network}  listening on its address in the chosen
    (both ends now leave the VM to us)       network (a refused pre-flight starts nothing)
    QEMU migrate (pre-copy, the convergence ladder); at pre-switchover the source is
    stopped and its disks flushed; the device state follows
                ─── vm.commit ─────────────▶ incoming complete?
                                             record: owner = destination     ◀── COMMIT POINT
                                             cont: the VM runs here
    quit the source QEMU

Before the commit point every step rolls back: the destination's QEMU is killed and
the source continues (QEMU resumes a source whose migration failed). The commit is a
compare-and-set on the record's generation at the volume's coordinator, so it happens
at most once; when the source cannot tell whether it happened (the commit call timed
out) it moves the generation on itself: if that succeeds no commit can follow, and it
rolls back; if it finds the destination owns the VM, the migration succeeded.

If the mark fails the destination's QEMU is dropped; if the destination refuses, the
mark is taken back. Until the mark lands the destination's reconcile step gives an
unmarked incoming QEMU PENDING_UNMARKED_S before it drops it.

Quick migration is the same with the state saved to ``/.shoal/vms/<name>.state`` on
the VM's volume instead of streamed between QEMUs, so its pre-flight is a call of its
own (``vm.preflight``, beside the mark) and ``vm.incoming`` follows the save.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from shoal.agent.errors import AgentError
from shoal.agent.vms import RegistryError
from shoal.agent.volumes import VM_LANE
from shoal.coordinator import messages
from shoal.vm.errors import MigrationError, VMError
from shoal.vm.record import VMRecord, state_path

if TYPE_CHECKING:
    from shoal.agent.vms import Instance, VMManager

log = logging.getLogger(__name__)

#: longest a whole migration may take before the ladder aborts it
MIGRATION_TIMEOUT_S = 600.0
COMMIT_TIMEOUT_S = 30.0
#: memory a destination keeps free beyond the VM's own
MEMORY_HEADROOM_MIB = 64
#: extra room in a quick migration's state file beyond the guest's memory
STATE_HEADROOM = 256 << 20
DEFAULT_BANDWIDTH_MIB_S = 1024
#: notes kept in a record are cut to this many characters (the record must fit 4 KiB)
NOTE_MAX = 300


# ---- which network -------------------------------------------------------------------------

def choose_network(mgr: VMManager, peer: str, rec: VMRecord, explicit: str | None) -> str:
    """The network a migration to ``peer`` uses, or MigrationError with a sentence.

    Default: the second-lowest metric network that is up between the two nodes (the
    lowest carries internal traffic), then the others by metric, the lowest last. With
    ``--network`` or the VM's own list only those are allowed, in order."""
    agent = mgr.agent
    up = agent._peer_up_map(peer)
    known = {n.name for n in agent.cfg.networks}
    strict = [explicit] if explicit else list(rec.spec.migration_networks)
    if strict:
        for net in strict:
            if net not in known:
                raise MigrationError(f"network {net!r} is not a network of this cluster.", phase="preflight")
            if net not in agent.metrics:
                raise MigrationError(f"network {net} carries no cluster traffic (role none), so shoal cannot "
                                     f"tell whether it works between {mgr.me} and {peer}; pick another.",
                                     phase="preflight")
        usable = [n for n in strict if up.get(n) and agent.peer_address(peer, n)]
        if not usable:
            which = "the chosen network" if explicit else "the VM's migration networks"
            raise MigrationError(f"cannot migrate {rec.name} to {peer}: {which} ({', '.join(strict)}) "
                                 f"{'is' if len(strict) == 1 else 'are'} down between {mgr.me} and {peer}; "
                                 "shoal does not fall back to another network. Restore the link, or pick "
                                 "another with --network.", phase="preflight")
        return usable[0]
    by_metric = sorted(agent.metrics, key=lambda n: (agent.metrics[n].value, n))
    order = by_metric[1:] + by_metric[:1]
    for net in order:
        if up.get(net) and agent.peer_address(peer, net):
            return net
    raise MigrationError(f"cannot migrate {rec.name}: no cluster network is up between {mgr.me} and {peer}.",
                         phase="preflight")


def settings_for(rec: VMRecord, bandwidth_mib_s: int | None) -> Any:
    from shoal.vm.migration import MigrationSettings

    return MigrationSettings(max_bandwidth_mib_s=bandwidth_mib_s or DEFAULT_BANDWIDTH_MIB_S,
                             allow_postcopy=rec.spec.allow_postcopy, total_timeout_s=MIGRATION_TIMEOUT_S)


# ---- the destination's side ---------------------------------------------------------------

def _mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


async def preflight(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    """Can this node take the VM? Every problem is one sentence."""
    rec = VMRecord.from_dict(args["record"])
    problems: list[str] = []
    if mgr.me in mgr.paused_nodes:  # as of the last reconcile step, at most a second old
        problems.append(f"{mgr.me} is paused (drained); resume it with 'shoal node resume {mgr.me}'.")
    if rec.name in mgr.local or rec.name in mgr.busy:
        problems.append(f"{mgr.me} already runs {rec.name}, or is moving it.")
    need = rec.spec.memory_mib + MEMORY_HEADROOM_MIB
    have = _mem_available_mib()
    if have < need:
        problems.append(f"{mgr.me} has {have} MiB of memory available; {rec.name} needs {need} MiB.")
    await mgr._accel_ready.wait()
    if args.get("accel") and args["accel"] != mgr.accel:
        problems.append(f"{mgr.me} runs VMs under {mgr.accel.upper()} and {args.get('from')} under "
                        f"{str(args['accel']).upper()}; a running VM cannot move between them.")
    network = args.get("network")
    if network and not mgr.agent.me.addresses.get(str(network)):
        problems.append(f"{mgr.me} has no address on network {network}.")
    for d in rec.spec.disks:
        rt = mgr.agent.volumes.get(d.volume)
        if rt is None:
            problems.append(f"{mgr.me} does not know volume {d.volume}.")
            continue
        if rt.statelog.state.value == "unavailable":
            problems.append(f"volume {d.volume} is unavailable on {mgr.me}, so disk {d} is not reachable there.")
    try:
        await mgr.machine(rec.spec)  # guest files, disk sockets
    except VMError as err:
        problems.append(f"{mgr.me}: {err}")
    return {"ok": not problems, "problems": problems, "node": mgr.me}


async def incoming(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    """Start a paused QEMU waiting for the VM's state; answer where to send it.

    A node busy with MAX_PARALLEL_MIGRATIONS already answers ``busy`` at once (never
    waits holding the caller): the source waits and asks again."""
    from shoal.vm.migration import load_state, prepare_incoming

    rec = VMRecord.from_dict(args["record"])
    name = rec.name
    if args.get("preflight"):
        pre = await preflight(mgr, args)
        if not pre["ok"]:
            return pre
    if name in mgr.local or name in mgr.busy or name in mgr.pending:
        raise AgentError(f"{mgr.me} already runs {name}, or is moving it.")
    if mgr.migration_slots.locked():
        return {"busy": True, "node": mgr.me}
    await mgr.migration_slots.acquire()  # free: returns at once
    mgr.busy.add(name)
    mgr.migrations_running += 1
    try:
        source = args.get("from", "?")
        t0 = time.monotonic()
        inst = await mgr.new_qemu(rec.spec, incoming=True, origin=f"{args.get('mode', 'live')} migration from {source}")
        started_ms = round((time.monotonic() - t0) * 1000, 1)
        mgr.pending[name] = inst
        settings = settings_for(rec, args.get("bandwidth"))
        if args.get("mode") == "quick":  # the state is on the volume already: load it all now
            await load_state(inst.qemu, _statefile_cmd(mgr, rec, "read"), settings)
            return {"uri": None, "node": mgr.me}
        addr = mgr.agent.me.addresses[str(args["network"])]
        uri = await prepare_incoming(inst.qemu, f"tcp:{addr}:0", settings)
        return {"uri": uri, "node": mgr.me, "qemu_start_ms": started_ms,
                "listen_ms": round((time.monotonic() - t0) * 1000 - started_ms, 1)}
    except BaseException:
        await _drop_pending(mgr, name, "the incoming side could not be prepared")
        _release(mgr, name)
        raise


async def commit(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    """The destination takes the VM: state complete → record → run. See the module doc."""
    from shoal.vm.migration import wait_incoming

    name, gen, source = str(args["name"]), int(args["gen"]), str(args["from"])
    inst = mgr.pending.get(name)
    if inst is None:
        raise MigrationError(f"{mgr.me} has no incoming {name} to commit (aborted meanwhile?).", phase="commit")
    await asyncio.wait_for(wait_incoming(inst.qemu), COMMIT_TIMEOUT_S)
    rec = VMRecord.from_dict(args["record"])  # as the source marked it: generation ``gen``
    if rec.gen != gen or rec.owner != source or rec.name != name:
        raise MigrationError(f"the commit request for {name} does not match its record.", phase="commit")
    mode = (rec.migration or {}).get("mode", "live")
    # COMMIT POINT: from here the destination owns the VM; the source never runs it again.
    # Compare-and-set on ``gen``: refused if anybody (the source settling a failed
    # commit, a failover) changed the record since the source marked it.
    try:
        new = await mgr.update(rec, owner=mgr.me, migration=None, note=f"{mode} migration from {source}",
                               last_migration=args.get("figures"))
    except RegistryError as err:
        if err.record is not None and err.record.get("owner") == mgr.me:
            new = VMRecord.from_dict(err.record)  # our update landed; its answer was lost
        else:
            await _drop_pending(mgr, name, f"the commit was refused: {err}")
            raise MigrationError(f"{mgr.me} could not take {name}: {err}", phase="commit") from err
    except BaseException:
        # unknown whether it landed: keep the paused QEMU; the reconcile step runs it if
        # the record names us, or drops it if not
        raise
    mgr.pending.pop(name, None)
    inst.owned_since = time.monotonic()
    mgr.local[name] = inst
    try:
        await inst.qemu.cont()
        resumed = True
    except VMError as err:  # ours now but not running: the reconcile step starts it afresh
        log.error("%s: %s did not resume after migration (%s); it will be restarted", mgr.me, name, err)
        with contextlib.suppress(Exception):
            await mgr._end(inst, "did not resume after migration", kill=True)
        resumed = False
    _release(mgr, name)
    mgr.agent.event("vm", vm=name, action="arrived", mode=mode, source=source)
    return {"record": new.to_dict(), "resumed": resumed}


async def abort(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    await _drop_pending(mgr, str(args["name"]), str(args.get("why", "the source aborted the migration")))
    return {}


async def _drop_pending(mgr: VMManager, name: str, why: str) -> None:
    """Kill an uncommitted incoming QEMU and give its migration slot back."""
    inst = mgr.pending.pop(name, None)
    if inst is not None:
        with contextlib.suppress(Exception):
            await mgr._end(inst, f"incoming migration dropped: {why}", kill=True)
        _release(mgr, name)


def _release(mgr: VMManager, name: str) -> None:
    if name in mgr.busy:
        mgr.busy.discard(name)
        mgr.migrations_running -= 1
        mgr.migration_slots.release()


def _statefile_cmd(mgr: VMManager, rec: VMRecord, how: str) -> str:
    rt = mgr._runtime(rec.spec.volume)
    export = state_path(rec.name).strip("/")
    return f"{sys.executable} -m shoal.vm.statefile {how} {rt.socket_path} {export}"


# ---- the source's side ----------------------------------------------------------------------

async def migrate(mgr: VMManager, name: str, to: str, *, quick: bool = False, network: str | None = None,
                  bandwidth_mib_s: int | None = None) -> dict[str, Any]:
    """Move ``name`` (running here) to ``to``; the figures, or MigrationError with the VM
    still running here."""
    cached = mgr.cached.get(name)
    # the reconcile step's copy spares a round trip; the mark below is a compare-and-set,
    # so a stale copy costs a retry, never a wrong move
    rec = cached if cached is not None and cached.owner == mgr.me and name in mgr.local else await mgr.find(name)
    if rec.owner != mgr.me or name not in mgr.local:
        raise AgentError(f"{name} does not run on {mgr.me} (its owner is {rec.owner or 'nobody'}).")
    if to == mgr.me:
        raise AgentError(f"{name} already runs on {to}.")
    mgr.agent.cfg.node(to)
    net = choose_network(mgr, to, rec, network) if not quick else None
    mode = "quick" if quick else "live"
    t_queue = time.monotonic()
    async with mgr.migration_slots:
        if name in mgr.busy:
            raise AgentError(f"{name} is already being moved or started.")
        mgr.busy.add(name)
        mgr.migrations_running += 1
        try:
            return await _migrate(mgr, rec, to, mode, net, bandwidth_mib_s, time.monotonic() - t_queue)
        finally:
            mgr.busy.discard(name)
            mgr.migrations_running -= 1


async def _migrate(mgr: VMManager, rec: VMRecord, to: str, mode: str, net: str | None,
                   bandwidth: int | None, queued_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    last = t0

    def lap(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        phases[name] = round((now - last) * 1000, 1)
        last = now

    inst = mgr.local.get(rec.name)
    if inst is None:
        raise AgentError(f"{rec.name} stopped running on {mgr.me} before it could be moved.")
    # the destination's pre-flight (live: and its QEMU start) and the record's mark run
    # at once; a refused pre-flight takes the mark back, a failed mark drops the
    # destination's QEMU, so nothing has moved either way
    args = {"record": rec.to_dict(), "network": net, "from": mgr.me, "accel": mgr.accel, "mode": mode,
            "bandwidth": bandwidth}
    first = (_incoming(mgr, to, {**args, "preflight": True}) if mode == "live" else
             mgr.agent.call_peer(to, "vm.preflight", lane=VM_LANE, args=args))
    first_r, mark_r = await asyncio.gather(first, _mark(mgr, rec, to, mode, net), return_exceptions=True)
    if isinstance(mark_r, BaseException):
        if mode == "live" and not isinstance(first_r, BaseException):
            with contextlib.suppress(Exception):
                await mgr.agent.call_peer(to, "vm.abort", lane=VM_LANE, timeout_s=15,
                                          args={"name": rec.name, "why": f"the record could not be marked: {mark_r}"})
        raise mark_r
    rec = mark_r
    try:
        if isinstance(first_r, BaseException):
            raise first_r
        out = first_r if isinstance(first_r, dict) else _answer(first_r, "preflight")
        if not out.get("ok", True):
            raise MigrationError(" ".join(out.get("problems", [])) or f"{to} refused the VM.", phase="preflight")
    except BaseException as err:
        with contextlib.suppress(Exception):
            await mgr.update(rec, migration=None, note=f"migration to {to} refused: {err}"[:NOTE_MAX])
        raise
    lap("destination" if mode == "live" else "preflight")
    stopped_at: float | None = None
    stats: Any = None
    try:
        if mode == "quick":  # the state goes to the volume first; the destination reads it back
            await _ensure_state_file(mgr, rec)
            stats, stopped_at = await _save(mgr, inst, rec)
            lap("save")
            out = await _incoming(mgr, to, {**args, "record": rec.to_dict()})
            lap("destination")
        for k in ("qemu_start_ms", "listen_ms"):
            if out.get(k) is not None:
                phases[f"destination_{k[:-3]}"] = out[k]
        if mode == "live":
            stats, stopped_at = await _live(mgr, inst, rec, str(out["uri"]), bandwidth)
            lap("transfer")
    except BaseException as err:
        await _roll_back(mgr, inst, rec, to, str(err) or type(err).__name__)
        if isinstance(err, Exception):
            phase = err.phase if isinstance(err, MigrationError) else "transfer"
            raise MigrationError(f"migrating {rec.name} to {to} failed: {str(err).rstrip('.')}. {rec.name} keeps "
                                 f"running on {mgr.me}.", phase=phase) from err
        raise
    figures = _figures(stats, mode, net, mgr.me, to, queued_s)
    figures["volume"] = rec.spec.volume
    committed = await _commit(mgr, inst, rec, to, figures)
    lap("commit")
    figures["downtime_ms"] = round((committed - stopped_at) * 1000, 1) if stopped_at else None
    figures["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
    figures["phases_ms"] = phases
    figures["t"] = time.time()  # when it ended (wall clock), so overlaps can be checked
    # the VM runs on the destination: the source's stopped QEMU and the figures' last
    # word are tidied up without keeping the caller waiting
    inst.stopping = True
    if mgr.local.get(rec.name) is inst:
        del mgr.local[rec.name]
    mgr.agent._spawn(_after_commit(mgr, inst, rec.name, to, mode, figures))
    log.warning("%s: %s migrated to %s over %s: downtime %s ms, total %s ms (%s)", mgr.me, rec.name, to,
                net or "-", figures["downtime_ms"], figures["total_ms"],
                ", ".join(f"{k} {v:g}" for k, v in phases.items()))
    mgr.agent.event("vm", vm=rec.name, action="migrated", to=to, **{k: v for k, v in figures.items()
                                                                     if k in ("downtime_ms", "network", "mode")})
    return {"vm": rec.name, **figures}


async def _after_commit(mgr: VMManager, inst: Instance, name: str, to: str, mode: str,
                        figures: dict[str, Any]) -> None:
    await mgr._end(inst, f"moved to {to} ({mode} migration)", kill=False)
    with contextlib.suppress(Exception):
        cur = await mgr.get(figures["volume"], name)
        if cur.owner == to and cur.migration is None:  # never race a newer migration's mark
            await mgr.update(cur, last_migration=figures)


async def _live(mgr: VMManager, inst: Instance, rec: VMRecord, uri: str,
                bandwidth: int | None) -> tuple[Any, float | None]:
    from shoal.vm.migration import run_live_migration

    stopped: list[float] = []

    async def on_switchover() -> None:
        # the source is stopped and its disks flushed; nothing is committed yet
        stopped.append(time.monotonic())

    stats = await run_live_migration(inst.qemu, uri, settings_for(rec, bandwidth), on_switchover)
    return stats, (stats.stopped_at or (stopped[0] if stopped else None))


async def _save(mgr: VMManager, inst: Instance, rec: VMRecord) -> tuple[Any, float]:
    from shoal.vm.migration import save_state

    t = time.monotonic()
    stats = await save_state(inst.qemu, _statefile_cmd(mgr, rec, "write"))
    return stats, stats.stopped_at or t


async def _ensure_state_file(mgr: VMManager, rec: VMRecord) -> None:
    rt = mgr._runtime(rec.spec.volume)
    size = (rec.spec.memory_mib << 20) + STATE_HEADROOM
    path = state_path(rec.name)
    st = await rt._meta_call("stat", {"path": path})
    if isinstance(st, dict) and st.get("error") == "not-found":
        messages.check_result(await rt._meta_call("create", {"path": path, "size": size}))
    else:
        messages.check_result(st)
        if int(st["size"]) < size:
            messages.check_result(await rt._meta_call("resize", {"path": path, "size": size}))


async def _mark(mgr: VMManager, rec: VMRecord, to: str, mode: str, net: str | None) -> VMRecord:
    """Mark the record: a migration to ``to`` is under way (both ends leave the VM alone)."""
    for attempt in range(3):
        try:
            return await mgr.update(rec, migration={"to": to, "mode": mode, "network": net, "since": time.time()},
                                    note=f"{mode} migration to {to} under way")
        except RegistryError as err:
            if err.code != "conflict" or attempt == 2:
                raise
            rec = await mgr.get(rec.spec.volume, rec.name)
            if rec.owner != mgr.me or rec.migration is not None or rec.desired != "running":
                raise AgentError(f"{rec.name} changed meanwhile (owner {rec.owner}, {rec.desired}); not moving it.") from err
    raise AssertionError("unreachable")


def _answer(reply: tuple[Any, bytes, str], phase: str) -> dict[str, Any]:
    """The result of a call to the destination; its refusal as MigrationError."""
    result = reply[0]
    if isinstance(result, dict) and result.get("error"):
        raise MigrationError(str(result.get("message")), phase=phase)
    return dict(result)


async def _incoming(mgr: VMManager, to: str, args: dict[str, Any]) -> dict[str, Any]:
    """Ask ``to`` to prepare; while it is busy with other migrations, wait (queued)."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    timeout = 60 if args["mode"] == "live" else MIGRATION_TIMEOUT_S
    while True:
        out = _answer(await mgr.agent.call_peer(to, "vm.incoming", lane=VM_LANE, args=args, timeout_s=timeout),
                      "prepare")
        if not out.get("busy"):
            return out
        if time.monotonic() > deadline:
            raise MigrationError(f"{to} stayed busy with other migrations for {MIGRATION_TIMEOUT_S:g} s.",
                                 phase="prepare")
        await asyncio.sleep(0.5)


async def _commit(mgr: VMManager, inst: Instance, rec: VMRecord, to: str, figures: dict[str, Any]) -> float:
    """Ask the destination to commit; the monotonic time it answered. On any failure,
    settle whether the commit happened (see the module doc) and roll back if it did not."""
    try:
        _answer(await mgr.agent.call_peer(to, "vm.commit", lane=VM_LANE, args={
            "name": rec.name, "record": rec.to_dict(), "gen": rec.gen, "from": mgr.me, "figures": figures},
            timeout_s=COMMIT_TIMEOUT_S + 10), "commit")
        return time.monotonic()
    except Exception as err:  # noqa: BLE001 - whatever it was, the record decides
        why = str(err) or type(err).__name__
    if await settle(mgr, rec, to, f"migration to {to} failed at the commit: {why}"):
        log.warning("%s: %s: the commit call failed (%s) but %s owns the VM: migrated", mgr.me, rec.name, why, to)
        return time.monotonic()
    await _roll_back(mgr, inst, None, to, f"the commit failed: {why}")
    raise MigrationError(f"the commit failed ({why})", phase="commit")


async def settle(mgr: VMManager, rec: VMRecord, to: str, note: str) -> bool:
    """Did ``to`` commit the migration ``rec`` marked? True if it owns the VM; False once
    the record's generation moved on without it (then it never can: its commit is a
    compare-and-set on the marked generation) and the mark is cleared. Retries while
    the coordinator cannot be reached: the VM stays stopped until the answer is known."""
    while True:
        try:
            cur = await mgr.get(rec.spec.volume, rec.name)
            if cur.owner == to:
                return True
            if cur.owner != mgr.me:
                raise MigrationError(f"{rec.name} belongs to {cur.owner} now.", phase="commit")
            await mgr.update(cur, migration=None, note=note[:NOTE_MAX])
            return False
        except MigrationError:
            raise
        except Exception as err:  # noqa: BLE001 - conflict, coordinator away: read again
            log.warning("%s: %s: settling the commit: %s; retrying", mgr.me, rec.name, err)
            await asyncio.sleep(0.5)


async def _roll_back(mgr: VMManager, inst: Instance, rec: VMRecord | None, to: str, why: str) -> None:
    """Before the commit point: the destination lets go, the source runs on."""
    with contextlib.suppress(Exception):
        await mgr.agent.call_peer(to, "vm.abort", lane=VM_LANE, args={"name": inst.name, "why": why}, timeout_s=15)
    try:
        status = await inst.qemu.status()
        if status != "running":
            await inst.qemu.cont()
    except Exception as err:  # noqa: BLE001 - say it; the reconcile step sees a dead QEMU
        log.error("%s: %s could not be resumed after a failed migration: %s", mgr.me, inst.name, err)
    if rec is not None:
        with contextlib.suppress(Exception):
            cur = await mgr.get(rec.spec.volume, rec.name)
            if cur.owner == mgr.me and cur.migration:
                await mgr.update(cur, migration=None, note=f"migration to {to} failed: {why}"[:NOTE_MAX])
    log.warning("%s: migration of %s to %s rolled back: %s", mgr.me, inst.name, to, why)
    mgr.agent.event("vm", vm=inst.name, action="migration-failed", to=to, why=why)


def _figures(stats: Any, mode: str, net: str | None, src: str, dst: str, queued_s: float) -> dict[str, Any]:
    def get(name: str) -> Any:
        return getattr(stats, name, None)

    return {"mode": mode, "from": src, "to": dst, "network": net, "qemu_downtime_ms": get("downtime_ms"),
            "qemu_total_ms": get("total_time_ms"), "transferred_bytes": get("transferred_bytes"),
            "iterations": get("iterations"), "mbps": get("mbps"), "queued_s": round(queued_s, 3),
            "policy": [str(x)[:200] for x in (get("steps") or ())][-8:], "postcopy": get("postcopy"), "t": time.time()}


# ---- drain ------------------------------------------------------------------------------------

async def drain(mgr: VMManager) -> dict[str, Any]:
    """Pause this node (no new VMs) and live-migrate every VM it runs elsewhere, at most
    MAX_PARALLEL_MIGRATIONS at a time."""
    await mgr.set_paused(mgr.me, True)
    recs, paused, _ = await mgr.records(wait_s=None)
    mine = [r for r in recs.values() if r.owner == mgr.me and r.name in mgr.local]
    planned: dict[str, str] = {}
    load: dict[str, int] = {}
    for r in recs.values():
        if r.owner and r.desired == "running":
            load[r.owner] = load.get(r.owner, 0) + 1
    for r in mine:
        target = mgr.place(r, recs, paused | {mgr.me}, exclude=mgr.me)
        planned[r.name] = target
        recs[r.name] = r.changed(owner=target)  # later choices see this one's load

    async def one(r: VMRecord) -> dict[str, Any]:
        try:
            return await migrate(mgr, r.name, planned[r.name])
        except Exception as err:  # noqa: BLE001 - every VM gets its own verdict
            return {"vm": r.name, "to": planned[r.name], "error": str(err) or type(err).__name__}

    results = await asyncio.gather(*(one(r) for r in mine))
    left = [r["vm"] for r in results if r.get("error")]
    mgr.agent.event("vm", action="drained", node=mgr.me, moved=len(results) - len(left), left=left)
    return {"node": mgr.me, "paused": True, "results": list(results), "left": left}
