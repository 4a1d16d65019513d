"""VM requests: from the CLI (control socket, ``control_vm_*`` on the agent) and between
agents (``vm.*`` on the agent channel). A request about a VM is carried out by its
owner: the agent the CLI talks to forwards it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.agent import vm_migrate
from shoal.agent.errors import AgentError
from shoal.agent.volumes import LONG_LANE, VM_LANE
from shoal.coordinator import messages
from shoal.membership import NodeState
from shoal.vm.errors import GuestError, VMError
from shoal.vm.record import VMRecord, VMSpec

if TYPE_CHECKING:
    from shoal.agent.agent import NodeAgent
    from shoal.agent.vms import VMManager

#: a migration or drain may take long: the forwarding call waits this much
LONG_CALL_S = 3600.0
CONSOLE_MAX = 64 << 10


# ---- between agents -------------------------------------------------------------------------

async def peer_request(agent: NodeAgent, peer: str, op: str, args: dict[str, Any]) -> Any:
    mgr = agent.vms
    if op == "vm.kick":
        await mgr.kick()
        return {}
    if op == "vm.status":
        return await mgr.status()
    handler = _PEER_OPS.get(op)
    if handler is None:
        return {"error": "invalid-argument", "message": f"unknown VM request {op}"}
    try:
        return await handler(mgr, args)
    except (VMError, AgentError) as err:
        return {"error": "vm", "message": str(err)}


def _checked(result: Any) -> Any:
    if isinstance(result, dict) and result.get("error"):
        raise AgentError(str(result.get("message")))
    return result


async def on_owner(agent: NodeAgent, rec: VMRecord, op: str, args: dict[str, Any]) -> Any:
    """Run ``op`` on the VM's owner (here, or forwarded)."""
    if not rec.owner:
        raise AgentError(f"{rec.name} has no owner node; start it with 'shoal vm start {rec.name}'.")
    if rec.owner == agent.name:
        return _checked(await _PEER_OPS[op](agent.vms, args))
    result, _, _ = await agent.call_peer(rec.owner, op, args, lane=LONG_LANE, timeout_s=LONG_CALL_S)
    return _checked(result)


async def _start_now(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    rec = await mgr.find(str(args["name"]))
    if rec.owner != mgr.me or rec.desired != "running":
        raise AgentError(f"{rec.name} is not meant to run on {mgr.me} (owner {rec.owner}, {rec.desired}).")
    for _ in range(600):
        if rec.name not in mgr.busy:
            break
        await asyncio.sleep(0.1)
    else:
        raise AgentError(f"{rec.name} is being started or moved on {mgr.me}; retry in a moment.")
    if rec.name not in mgr.local:
        mgr.busy.add(rec.name)
        try:
            await mgr.start_instance(rec, str(args.get("origin", "started")))
        finally:
            mgr.busy.discard(rec.name)
    inst = mgr.local[rec.name]
    return {"node": mgr.me, "pid": inst.qemu.pid, "accel": mgr.accel, "accel_reason": mgr.accel_reason}


async def _stop_now(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    how = await mgr.stop_local(str(args["name"]), force=bool(args.get("force")),
                               test_guest=bool(args.get("test_guest")))
    return {"node": mgr.me, "how": how}


async def _console(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    _, path = mgr.paths(str(args["name"]))
    offset = int(args.get("offset", -1))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {"node": mgr.me, "text": "", "offset": 0}
    if offset < 0 or offset > size:
        offset = max(0, size - CONSOLE_MAX)
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(CONSOLE_MAX)
    return {"node": mgr.me, "text": data.decode(errors="replace"), "offset": offset + len(data)}


async def _migrate(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    return await vm_migrate.migrate(mgr, str(args["name"]), str(args["to"]), quick=bool(args.get("quick")),
                                    network=args.get("network"), bandwidth_mib_s=args.get("bandwidth"))


async def _drain(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    return await vm_migrate.drain(mgr)


async def _verify(mgr: VMManager, args: dict[str, Any]) -> dict[str, Any]:
    name = str(args["name"])
    rec = await mgr.find(name)
    inst = mgr.local.get(name)
    if inst is None:
        raise AgentError(f"{name} does not run on {mgr.me}.")
    if name in mgr.busy:
        raise AgentError(f"{name} is being moved or started; verify it when that is done.")
    text = inst.console.read_text(errors="replace")
    since = text.rfind("\n--- shoal:")
    here = text[since:] if since >= 0 else text
    arrived = "migration" in inst.origin
    if rec.spec.test_guest == "memory":
        return await _verify_memory(mgr, inst, here, arrived)
    if rec.spec.test_guest == "disk":
        from shoal.vm.guests.check import check_disk_log

        v = check_disk_log(text)
        boots_here = check_disk_log(here).boots
        ok = v.errors == 0 and v.rounds > 0 and boots_here == (0 if arrived else 1)
        return {"vm": name, "node": mgr.me, "ok": ok, "kind": "disk", "rounds": v.rounds, "errors": v.errors,
                "verified_blocks": v.verified, "restarts_since_arrival": boots_here if arrived else boots_here - 1,
                "verdict": v.explanation if not ok or v.errors else
                f"{v.rounds} rounds, {v.verified} blocks read back, 0 errors, no restart"}
    raise AgentError(f"{name} is not a test guest; 'vm verify' checks test guests only.")


async def _verify_memory(mgr: VMManager, inst: Any, console_here: str, arrived: bool) -> dict[str, Any]:
    from shoal.vm.guests import check

    log_v = check.check_memory_log(console_here)
    if not arrived and log_v.boots == 0:
        return {"vm": inst.name, "node": mgr.me, "ok": False, "kind": "memory", "restarted": False,
                "verdict": "the guest has not finished booting yet (no start line on its console); try again",
                "paused_ms": 0.0, "pass": None}
    restarted = log_v.boots > (0 if arrived else 1)
    q = inst.qemu
    t0 = time.monotonic()
    await q.stop()
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-verify-") as d:
            head_path = Path(d) / "header"
            await q.pmemsave(check.HEADER_ADDR, check.HEADER_SIZE, str(head_path))
            header = check.parse_header(head_path.read_bytes())
            dump = Path(d) / "dump"
            await q.pmemsave(header.start, header.end - header.start, str(dump))
            verdict = check.check_memory(dump.read_bytes(), header)
    finally:
        await q.cont()
    paused_ms = round((time.monotonic() - t0) * 1000, 1)
    ok = verdict.ok and not restarted
    sentence = verdict.explanation if verdict.ok else f"memory check failed: {verdict.explanation}"
    if restarted:
        sentence += " The serial log shows the guest started again."
    return {"vm": inst.name, "node": mgr.me, "ok": ok, "kind": "memory", "verdict": sentence,
            "paused_ms": paused_ms, "pass": log_v.last_pass, "restarted": restarted}


_PEER_OPS = {
    "vm.start_now": _start_now,
    "vm.stop_now": _stop_now,
    "vm.console": _console,
    "vm.migrate": _migrate,
    "vm.drain": _drain,
    "vm.verify": _verify,
    "vm.preflight": vm_migrate.preflight,
    "vm.incoming": vm_migrate.incoming,
    "vm.commit": vm_migrate.commit,
    "vm.abort": vm_migrate.abort,
}


# ---- from the CLI ---------------------------------------------------------------------------

async def create(agent: NodeAgent, spec: dict[str, Any], start: bool) -> dict[str, Any]:
    mgr = agent.vms
    s = VMSpec.from_dict(spec).validate(nodes=[n.name for n in agent.cfg.nodes],
                                        networks=[n.name for n in agent.cfg.networks],
                                        volumes=[v.name for v in agent.cfg.volumes])
    if s.test_guest:
        from shoal.vm.guests.paths import locate

        try:
            locate(s.test_guest)
        except GuestError as err:
            raise AgentError(str(err)) from err
    recs, _, answered = await mgr.records(wait_s=30)
    missing = [v.name for v in agent.cfg.volumes if v.name not in answered]
    if s.name in recs:
        raise AgentError(f"a VM named {s.name} already exists (on {recs[s.name].spec.volume}); pick another name.")
    if missing:
        raise AgentError(f"no coordinator of {', '.join(missing)} answers, so shoal cannot check that the name "
                         f"{s.name} is free; retry when 'shoal volume ls' shows one.")
    created = []
    for d in s.disks:
        rt = mgr._runtime(d.volume)
        st = await rt._meta_call("stat", {"path": d.path})
        if isinstance(st, dict) and st.get("error") == "not-found":
            if not d.size:
                raise AgentError(f"disk {d} does not exist; give its size to create it "
                                 f"(--disk {d},size=1G).")
            parent = d.path.rsplit("/", 1)[0]
            if parent:
                await rt._meta_call("mkdir", {"path": parent, "parents": True})
            messages.check_result(await rt._meta_call("create", {"path": d.path, "size": d.size}))
            created.append(str(d))
        else:
            messages.check_result(st)
    rec = VMRecord(spec=s, desired="stopped", note=f"created from {agent.name}")
    out = await mgr.registry(s.volume, "create", record=rec.to_dict())
    result: dict[str, Any] = {"record": out["record"], "created_disks": created}
    if start:
        result["start"] = await start_vm(agent, s.name, None)
    return result


async def start_vm(agent: NodeAgent, name: str, on: str | None) -> dict[str, Any]:
    mgr = agent.vms
    recs, paused, _ = await mgr.records(wait_s=None)
    rec = recs.get(name) or await mgr.find(name)
    if on is not None:
        agent.cfg.node(on)
        if on != agent.name and agent.membership.state(on) is not NodeState.UP:
            raise AgentError(f"{on} is {agent.membership.state(on).value}; it cannot start a VM now.")
        if on in paused:
            raise AgentError(f"{on} is paused (drained); resume it with 'shoal node resume {on}' first.")
    if rec.desired == "running" and rec.owner and (on is None or on == rec.owner):
        target = rec.owner
    elif rec.desired == "running" and rec.owner and rec.owner != on:
        raise AgentError(f"{name} runs on {rec.owner}; move it with 'shoal vm migrate {name} --to {on}'.")
    else:
        target = on or (rec.owner if rec.owner in mgr.candidates(paused) else mgr.place(rec, recs, paused))
        if rec.owner and rec.owner != target:
            await _not_running_on(agent, rec)
        rec = await mgr.update(rec, owner=target, desired="running", note=f"started on {target}")
    return await on_owner(agent, rec, "vm.start_now", {"name": name, "origin": "started"})


async def _not_running_on(agent: NodeAgent, rec: VMRecord) -> None:
    """Before a stopped VM starts elsewhere: its last owner must confirm it ended it
    (a stop may still be under way there), or be down and fenced (nothing runs)."""
    old = str(rec.owner)
    if old == agent.name:
        running = rec.name in agent.vms.local or rec.name in agent.vms.busy
    else:
        try:
            st, _, _ = await agent.call_peer(old, "vm.status", {}, lane=VM_LANE, timeout_s=10)
            running = rec.name in st.get("vms", {})
        except Exception as err:  # noqa: BLE001 - unreachable: only a fence makes it safe
            if agent.membership.state(old) is NodeState.DOWN:
                return  # dead; its QEMUs died with its agent, and a fenced node writes nothing
            raise AgentError(f"{rec.name} last ran on {old}, which does not answer ({err}); start it there, "
                             f"or wait until {old} is down.") from err
    if running:
        raise AgentError(f"{rec.name} is still stopping on {old}; retry in a moment.")


async def stop_vm(agent: NodeAgent, name: str, force: bool) -> dict[str, Any]:
    mgr = agent.vms
    rec = await mgr.find(name)
    owner = rec.owner
    if rec.desired != "stopped":
        rec = await mgr.update(rec, desired="stopped", note="killed" if force else "stopped")
    if not owner:
        return {"node": None, "how": "was not running"}
    args = {"name": name, "force": force, "test_guest": bool(rec.spec.test_guest)}
    if owner == agent.name:
        return _checked(await _stop_now(mgr, args))
    result, _, _ = await agent.call_peer(owner, "vm.stop_now", args, lane=VM_LANE, timeout_s=120)
    return _checked(result)


async def delete_vm(agent: NodeAgent, name: str) -> dict[str, Any]:
    mgr = agent.vms
    rec = await mgr.find(name)
    if rec.desired == "running":
        raise AgentError(f"{name} is running; stop it first ('shoal vm stop {name}').")
    await mgr.registry(rec.spec.volume, "delete", name=name, vm_gen=rec.gen)
    return {"deleted": name, "disks_kept": [str(d) for d in rec.spec.disks]}


async def list_vms(agent: NodeAgent) -> dict[str, Any]:
    mgr = agent.vms
    recs, paused, answered = await mgr.records()
    owners = {r.owner for r in recs.values() if r.owner}
    live: dict[str, dict[str, Any]] = {}

    async def one(node: str) -> None:
        with contextlib.suppress(Exception):
            if node == agent.name:
                st = await mgr.status()
            else:
                st, _, _ = await agent.call_peer(node, "vm.status", {}, lane=VM_LANE, timeout_s=5)
            live[node] = st

    await asyncio.gather(*(one(n) for n in owners | {agent.name}))
    rows = []
    for rec in sorted(recs.values(), key=lambda r: r.name):
        inst = live.get(rec.owner or "", {}).get("vms", {}).get(rec.name)
        if rec.migration:
            state = f"migrating to {rec.migration.get('to')}"
        elif inst is not None:
            state = str(inst["status"])
        elif rec.desired == "running":
            state = "starting" if rec.owner in live else "unknown (owner does not answer)"
        else:
            state = "stopped"
        rows.append({"name": rec.name, "state": state, "owner": rec.owner if rec.desired == "running" else None,
                     "desired": rec.desired, "uptime_s": inst["uptime_s"] if inst else None,
                     "memory_mib": rec.spec.memory_mib, "cpus": rec.spec.cpus,
                     "test_guest": rec.spec.test_guest, "disks": [str(d) for d in rec.spec.disks],
                     "preferred_owners": list(rec.spec.preferred_owners),
                     "last_migration": rec.last_migration, "note": rec.note, "gen": rec.gen,
                     "history": list(rec.history)})
    missing = [v.name for v in agent.cfg.volumes if v.name not in answered]
    accel = {n: s.get("accel") for n, s in live.items()}
    return {"vms": rows, "paused_nodes": sorted(paused), "volumes_not_answering": missing, "accel": accel}


async def forward_vm(agent: NodeAgent, name: str, op: str, args: dict[str, Any]) -> Any:
    """Run ``op`` on the VM's owner: the one the last reconcile step saw, else a fresh read."""
    rec = agent.vms.cached.get(name)
    # only requests a non-owner refuses may take the hint (a console read would not)
    if op in ("vm.migrate", "vm.verify") and rec is not None and rec.owner and rec.desired == "running" \
            and rec.migration is None:
        try:
            return await on_owner(agent, rec, op, {"name": name, **args})
        except AgentError as err:
            if "does not run on" not in str(err):
                raise
    rec = await agent.vms.find(name)
    return await on_owner(agent, rec, op, {"name": name, **args})


async def drain_node(agent: NodeAgent, node: str) -> Any:
    agent.cfg.node(node)
    if node == agent.name:
        return await _drain(agent.vms, {})
    result, _, _ = await agent.call_peer(node, "vm.drain", {}, lane=LONG_LANE, timeout_s=LONG_CALL_S)
    return _checked(result)
