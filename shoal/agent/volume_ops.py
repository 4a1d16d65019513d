"""Requests about shared volumes between agents (``csv.*``) and from the CLI.

Between agents (the authenticated channel):

    to the coordinator   csv.meta  csv.io  csv.fio  csv.confirm     (CoordinatorRole.handle)
                         csv.move  csv.maintenance_set  csv.repair
    to any node          csv.whois  csv.state  csv.revoke  csv.coordinator
                         csv.maintenance  csv.takeover

Maintenance mode (volume-wide): every node drops its maps (waiting for the I/O using
them) and switches to *file-level* redirected I/O, so the coordinator may move extents;
the coordinator acknowledges ``maintenance on`` only after every node did (a node that
does not answer is fenced). ``repair`` sets it and clears it by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from shoal.agent.coordinator_role import CoordinatorRole, _not_coordinator
from shoal.agent.errors import AgentError
from shoal.agent.volumes import LONG_LANE
from shoal.datapath.states import Reason
from shoal.netft.errors import NetftError, RemoteError
from shoal.util.pipes import POOL, Piped
from shoal.volume.defrag import defrag
from shoal.volume.fsck import fsck_online
from shoal.volume.lease import LeaseArea

if TYPE_CHECKING:
    from shoal.agent.agent import NodeAgent
    from shoal.agent.volumes import VolumeRuntime

log = logging.getLogger("shoal.agent.volumes")

LONG_OP_TIMEOUT_S = 3600.0
COORDINATOR_OPS = {"csv.meta", "csv.io", "csv.fio", "csv.confirm", "csv.vm"}


def runtime(agent: NodeAgent, volume: Any) -> VolumeRuntime:
    rt = agent.volumes.get(str(volume))
    if rt is None:
        known = ", ".join(sorted(agent.volumes)) or "none"
        raise AgentError(f"no volume {volume!r} is declared in the cluster configuration (declared: {known}).")
    return rt


def view(rt: VolumeRuntime) -> dict[str, Any]:
    reasons = sorted(r.value for r in rt.reasons)
    if not rt.path.up:
        reasons = sorted({*reasons, Reason.NO_DISK_CONNECTIVITY.value})
    if rt.statelog.state.value != "redirected":
        reasons = []
    role = rt.role
    return {
        "node": rt.node, "volume": rt.name, "state": rt.statelog.state.value, "reasons": reasons,
        "since_s": round(time.monotonic() - rt.statelog.since, 3),
        "path_up": rt.path.up, "path_error": rt.path_reason or rt.path.failure or "",
        "coordinator": rt.coordinator, "epoch": rt.epoch, "maintenance": rt.maintenance,
        "fenced": rt.fenced, "generation": rt.generation, "key": rt.path.key,
        "role": rt.election.role.value if rt.election else "starting",
        "fencing": None if role is None else role.fencing_supported,
        "counters": rt.counters.to_json(), "socket": str(rt.socket_path),
        "history": list(rt.statelog.history)[-10:],
    }


# ---- between agents --------------------------------------------------------------------

#: a redirected write at least this large reaches the coordinator in a pipe (below it,
#: the splice system calls cost more than the copies they save)
PIPED_WRITE_MIN = 128 << 10


def pipe_payload(header: dict[str, Any], size: int) -> bool:
    """Whether a request's payload is received into a pipe: a large redirected write,
    which the coordinator splices on to the storage target without copying it
    (CoordinatorRole._block_io; the channel falls back to a buffer when no pipe can
    be had)."""
    if header.get("op") != "csv.io" or not PIPED_WRITE_MIN <= size <= POOL.size:
        return False
    args = header.get("args")
    return isinstance(args, dict) and args.get("kind") == "write"


async def peer_request(agent: NodeAgent, peer: str, op: str, args: dict[str, Any],
                       payload: bytes | Piped) -> tuple[Any, bytes | Piped]:
    rt = runtime(agent, args.get("volume"))
    if op in COORDINATOR_OPS:
        if rt.role is None:
            return _not_coordinator(f"{agent.name} is not coordinator of {rt.name}"), b""
        return await rt.role.handle(peer, op, args, payload)
    handler = _PEER_OPS.get(op)
    if handler is None:
        return {"error": "invalid-argument", "message": f"unknown volume request {op}"}, b""
    try:
        return await handler(rt, peer, args), b""
    except AgentError as err:  # a refusal, for the user: the sentence travels as it is
        raise RemoteError(str(err)) from err


async def _whois(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"node": rt.node, "epoch": rt.epoch, "serving": rt.is_coordinator(), "maintenance": rt.maintenance}


async def _state(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    return view(rt)


async def _revoke(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    await rt.maps.revoke(int(args["ino"]), int(args["version"]))
    return {}


async def _coordinator(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    node, epoch = str(args["node"]), int(args["epoch"])
    if epoch < rt.epoch:
        return {"error": "stale", "message": f"epoch {epoch} is older than {rt.epoch}"}
    rt.set_maintenance_flag(bool(args.get("maintenance")))
    rt.set_coordinator(node, epoch, f"{node} announced itself coordinator (epoch {epoch})")
    if not args.get("keep_maps"):
        await rt.drop_maps()
    return {"node": rt.node, "generation": rt.generation}


async def _maintenance(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    await rt.enter_maintenance(bool(args["on"]), "")
    return {"node": rt.node}


async def _takeover(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    """The coordinator asks us to take the role (planned move, or it lost its path)."""
    async with rt.role_lock:
        return await _take_role(rt, args)


async def _take_role(rt: VolumeRuntime, args: dict[str, Any]) -> dict[str, Any]:
    if rt.role is not None or rt.election is None or rt.direct_dev is None or rt.sb is None:
        return {"ok": False, "message": f"{rt.node} cannot take the role now"}
    if not (rt.path.up and rt._direct_allowed()):
        return {"ok": False, "message": f"{rt.node} has no working storage path to {rt.name}"}
    area = LeaseArea(rt.direct_dev, rt.sb)
    lease = await rt.run_lease(area.read_lease)
    if lease.owner != rt.node_id_of(str(args["from"])) or lease.epoch != int(args["epoch"]):
        return {"ok": False, "message": f"the lease names {lease.owner_name()} epoch {lease.epoch}, not "
                f"{args['from']} epoch {args['epoch']}"}
    planned = bool(args.get("planned"))
    election = rt.election
    t0 = time.monotonic()
    if not await rt.run_lease(lambda: election.take_over(lease, wait=not planned)):
        return {"ok": False, "message": "the lease changed during the hand-over"}
    role = rt.role = CoordinatorRole(rt)
    below = args.get("preempt_below")
    await role.become(lease, preempt_below=None if below is None else int(below), planned=planned,
                      holders=args.get("holders") or {}, fenced=args.get("fenced") or {},
                      maintenance=bool(args.get("maintenance")),
                      clean_seq=None if args.get("clean_seq") is None else int(args["clean_seq"]))
    if rt.role is None:
        return {"ok": False, "message": "could not open the volume"}
    vol = rt.role.vol
    return {"ok": True, "open_ms": round((time.monotonic() - t0) * 1000, 1),
            "replayed": None if vol is None else vol.meta.replayed}


def _role(rt: VolumeRuntime) -> CoordinatorRole:
    if rt.role is None or not rt.role.serving:
        raise AgentError(f"{rt.node} is not coordinator of {rt.name}")
    return rt.role


@contextlib.asynccontextmanager
async def _exclusive(role: CoordinatorRole, what: str) -> AsyncIterator[None]:
    """Run one administrative operation; refuse (not queue) while another one runs."""
    if role.admin.locked():
        raise AgentError(f"{role.rt.name} is busy: {role.admin_what} is running on {role.me}; "
                         f"retry {what} when it has finished")
    async with role.admin:
        role.admin_what = what
        try:
            yield
        finally:
            role.admin_what = ""


async def _move(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    to = str(args["to"])
    if to == rt.node:
        return {"from": rt.node, "to": to, "paused_ms": 0.0, "epoch": rt.epoch, "note": "already coordinator"}
    role = _role(rt)
    async with _exclusive(role, f"the move to {to}"):
        return await role.hand_over(to, planned=True)


async def set_maintenance(rt: VolumeRuntime, on: bool) -> dict[str, Any]:
    role = _role(rt)
    await rt.enter_maintenance(on, "")
    missed = []
    for p in rt.agent.peers:
        try:
            await rt.agent.call_peer(p.name, "csv.maintenance", {"volume": rt.name, "on": on},
                                     timeout_s=max(30.0, 16 * rt.io_timeout_s))
        except NetftError as err:
            missed.append(p.name)
            if on and not await role.fence(p.name, None, f"it did not acknowledge maintenance mode: {err}"):
                raise AgentError(f"{p.name} neither acknowledged maintenance mode nor could be fenced; "
                                 "maintenance is set but not safe for repair yet, retry") from err
    return {"volume": rt.name, "maintenance": on, "coordinator": rt.node, "unreached": missed}


async def _maintenance_set(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    on = bool(args["on"])
    async with _exclusive(_role(rt), f"maintenance {'on' if on else 'off'}"):
        return await set_maintenance(rt, on)


async def _repair(rt: VolumeRuntime, peer: str, args: dict[str, Any]) -> dict[str, Any]:
    kind = str(args.get("kind"))
    if kind not in ("fsck", "defrag"):
        raise AgentError(f"repair runs fsck or defrag, not {kind!r}")
    role = _role(rt)
    async with _exclusive(role, f"the {kind} repair"):
        report, problems, seconds = await _repair_now(rt, role, kind)
    return {"volume": rt.name, "kind": kind, "coordinator": rt.node, "report": report,
            "problems": problems, "seconds": seconds}


async def _repair_now(rt: VolumeRuntime, role: CoordinatorRole, kind: str) -> tuple[dict[str, Any], bool, float]:
    was_on = rt.maintenance
    t0 = time.monotonic()
    if not was_on:
        await set_maintenance(rt, True)
    try:
        if kind == "defrag":
            vol = role.vol
            assert vol is not None
            result = await rt.run_blocking(lambda: defrag(vol))
            report: dict[str, Any] = dataclasses.asdict(result)
            problems = bool(result.skipped)
        else:
            report = await _fsck_online(rt, role)
            problems = bool(report.get("error"))
    finally:
        if not was_on:
            await set_maintenance(rt, False)
    return report, problems, round(time.monotonic() - t0, 3)


async def _fsck_online(rt: VolumeRuntime, role: CoordinatorRole) -> dict[str, Any]:
    """Close the volume, check and repair it on our path, open it again (holders kept)."""
    election, dev = rt.election, rt.direct_dev
    assert election is not None and dev is not None
    report = await role.reopen(checkpoint=True, between=lambda: fsck_online(dev, repair=True, epoch=election.epoch))
    assert report is not None
    return dict(report.to_json())


_PEER_OPS = {
    "csv.whois": _whois, "csv.state": _state, "csv.revoke": _revoke, "csv.coordinator": _coordinator,
    "csv.maintenance": _maintenance, "csv.takeover": _takeover, "csv.move": _move,
    "csv.maintenance_set": _maintenance_set, "csv.repair": _repair,
}


# ---- from the CLI (control socket) ----------------------------------------------------------

async def forward_to_coordinator(rt: VolumeRuntime, op: str, args: dict[str, Any]) -> Any:
    """Run a coordinator-only request (move, maintenance, repair) wherever the role is."""
    coord = await rt._wait_for_coordinator()
    args = {**args, "volume": rt.name}
    if coord == rt.node:
        return await _PEER_OPS[op](rt, rt.node, args)
    try:
        # moves, maintenance and repairs take as long as they take (a lane of their own)
        result, _, _ = await rt.agent.call_peer(coord, op, args, lane=LONG_LANE, timeout_s=LONG_OP_TIMEOUT_S)
    except RemoteError as err:  # it answered: with a refusal
        raise AgentError(str(err)) from err
    except NetftError as err:
        raise AgentError(f"the coordinator {coord} of {rt.name} did not answer: {err}") from err
    return result


async def cluster_views(agent: NodeAgent) -> list[dict[str, Any]]:
    import asyncio

    from shoal.membership import NodeState

    out = []
    for rt in agent.volumes.values():
        nodes: dict[str, Any] = {rt.node: view(rt)}

        async def one(peer: str, rt: VolumeRuntime = rt, nodes: dict[str, Any] = nodes) -> None:
            try:
                async with asyncio.timeout(2.0):
                    res, _, _ = await agent.call_peer(peer, "csv.state", {"volume": rt.name})
                nodes[peer] = res
            except (NetftError, TimeoutError):
                nodes[peer] = {"node": peer, "state": "unknown", "reasons": [], "unreachable": True}

        await asyncio.gather(*(one(p.name) for p in agent.peers
                               if agent.membership.state(p.name) is NodeState.UP))
        for p in agent.peers:
            nodes.setdefault(p.name, {"node": p.name, "state": "unknown", "reasons": [], "unreachable": True})
        coord_views = [v for v in nodes.values() if v.get("role") == "coordinator"]
        coordinator = coord_views[0]["node"] if coord_views else rt.coordinator
        out.append({"volume": rt.name, "coordinator": coordinator,
                    "epoch": max((int(v.get("epoch") or 0) for v in nodes.values()), default=0),
                    "maintenance": any(v.get("maintenance") for v in nodes.values()),
                    "nodes": {k: nodes[k] for k in sorted(nodes)}})
    return out
