"""The node agent's main object.

Wiring (one asyncio loop, plus the liveness child process):

    heartbeatd (child) --events--> NodeAgent._on_event --> links table
                                                        --> membership (up/down/isolated)
                                                        --> routes (pure choose_route)
    control socket (unix) --> NodeAgent.control_*  (CLI)
    agent channel (TCP, HMAC) --> NodeAgent.peer_*  (other agents)

Cluster-wide network changes (``network set``): the receiving agent validates,
bumps the configuration generation, writes its own config file atomically,
re-evaluates routes at once, and pushes the new network table to every peer
over the authenticated channel. A peer that was unreachable catches up when it
next comes up: agents exchange generations whenever a peer comes up, and the
newer configuration wins. Configurations are ordered by (generation, digest of
the canonical network table) (see ``config_order``), so two different tables
written with the same generation on both sides of a partition still settle on
one, the same on every node. No shared filesystem is assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from shoal.agent import vm_ops, volume_ops
from shoal.agent.errors import AgentAlreadyRunning, AgentError
from shoal.agent.vms import VMManager
from shoal.agent.volumes import VolumeRuntime
from shoal.config.model import ClusterConfig, Network, Role, load_config, write_config
from shoal.membership import Membership, NodeState
from shoal.netft.channel import ChannelServer, Connection
from shoal.netft.errors import (
    AuthenticationFailed,
    NetftError,
    PeerUnreachable,
    RemoteError,
    RemoteProtocolError,
)
from shoal.netft.heartbeatd import Peer, Setup
from shoal.netft.links import LinkState
from shoal.netft.protocol import derive_key
from shoal.netft.routing import Metric, Route, assign_metrics, choose_route, failover_order
from shoal.util.pipes import Piped, drain_pipe

log = logging.getLogger("shoal.agent")

AUTH_PROBE_INTERVAL_S = 5.0
AUTH_LOG_INTERVAL_S = 30.0
MAX_EVENTS = 1000
PEER_VIEW_TIMEOUT_S = 2.0


def network_from_dict(d: dict[str, Any]) -> Network:
    import ipaddress

    metric = d.get("metric", "auto")
    return Network(
        name=str(d["name"]),
        subnet=ipaddress.ip_network(str(d["subnet"])),
        role=Role(d["role"]),
        metric=None if metric == "auto" else int(metric),
    )


def config_order(generation: int, networks: list[dict[str, Any]]) -> tuple[int, str]:
    """The order of network configurations: higher generation first, then, for the same
    generation with different tables, the greater digest of the canonical table.

    Pure and the same on every node, so nodes that each wrote a different table with
    the same generation (``network set`` on both sides of a partition) agree on the
    winner when they meet again.
    """
    canon = json.dumps([network_from_dict(d).to_dict() for d in networks], sort_keys=True,
                       separators=(",", ":"), default=str)
    return int(generation), hashlib.sha256(canon.encode()).hexdigest()


def is_newer(msg: Any, current: dict[str, Any]) -> bool:
    """Whether a received ``{"generation", "networks"}`` message beats ``current``."""
    if not isinstance(msg, dict) or "networks" not in msg:
        return False
    return config_order(msg.get("generation", 0), msg["networks"]) > config_order(
        current["generation"], current["networks"])


class NodeAgent:
    def __init__(self, config_path: str | os.PathLike[str], node: str):
        self.config_path = Path(config_path)
        self.cfg: ClusterConfig = load_config(self.config_path)
        self.me = self.cfg.node(node)
        secret = self.cfg.read_secret()
        self.hb_key = derive_key(secret, self.cfg.name, "heartbeat")
        self.ch_key = derive_key(secret, self.cfg.name, "channel")
        self.peers = [n for n in self.cfg.nodes if n.name != node]
        self.links: dict[tuple[str, str], tuple[LinkState, float | None]] = {}
        self.membership = Membership(node, [p.name for p in self.peers])
        self.membership.listeners.append(self._on_node_change)
        self.metrics: dict[str, Metric] = assign_metrics(self.cfg.networks)
        self.routes: dict[str, Route] = {p.name: Route(None, None) for p in self.peers}
        self.blocked: set[str] = set()
        self.conns: dict[tuple[str, str, int], Connection] = {}
        self.volumes: dict[str, VolumeRuntime] = {}
        #: per peer, until when its liveness slot on a shared volume counts as advancing
        #: (set_disk_alive; absent: not known)
        self.disk_alive: dict[str, float] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.channel = ChannelServer(self.cfg.name, node, self.ch_key, self._peer_request,
                                     pipe_payload=volume_ops.pipe_payload)
        self.hb: asyncio.subprocess.Process | None = None
        self.priority = "?"
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.auth_logged: dict[str, float] = {}
        self.auth_failures: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.vms = VMManager(self)

    # -- helpers --------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.me.name

    def enabled_networks(self) -> list[str]:
        return [n.name for n in self.cfg.networks if n.role.carries_cluster_traffic and n.name in self.me.addresses]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=task.exception())

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": time.time(), "mono": time.monotonic(), "kind": kind, **fields})

    async def _hb_send(self, obj: dict[str, Any]) -> None:
        if self.hb is not None and self.hb.stdin is not None:
            self.hb.stdin.write((json.dumps(obj) + "\n").encode())
            await self.hb.stdin.drain()

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        sock_path = self.cfg.control_socket(self.name)
        await self._claim_control_socket(sock_path)
        await self._start_heartbeatd()
        await self._sync_channel_servers()
        control = await asyncio.start_unix_server(self._control_conn, str(sock_path))
        os.chmod(sock_path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.warning(
            "node %s of cluster %s: agent running (pid %d), control socket %s, heartbeats every %g s "
            "on %s, %d missed = link down",
            self.name, self.cfg.name, os.getpid(), sock_path, self.cfg.timing.heartbeat_interval_s,
            ", ".join(self.enabled_networks()), self.cfg.timing.heartbeat_threshold,
        )
        self._spawn(self._auth_probe_loop())
        for vcfg in self.cfg.volumes:
            rt = self.volumes[vcfg.name] = VolumeRuntime(self, vcfg)
            self._spawn(self._start_volume(rt))
        self._spawn(self.vms.run())
        assert self.hb is not None
        hb_wait = asyncio.ensure_future(self.hb.wait())
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({hb_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if hb_wait in done:
                raise AgentError(
                    f"the heartbeat process of node {self.name} exited with status {hb_wait.result()}; "
                    "the agent stops rather than run without liveness."
                )
            log.warning("node %s: agent stopping", self.name)
        finally:
            stop_wait.cancel()
            await self.vms.stop()
            for rt in self.volumes.values():
                try:
                    await asyncio.wait_for(rt.stop(), 10)
                except Exception as err:  # noqa: BLE001 - stopping: say it and go on
                    log.warning("stopping volume %s: %s", rt.name, err)
            control.close()
            self.channel.close()
            for c in self.conns.values():
                c.close()
            with contextlib.suppress(OSError):
                sock_path.unlink()
            if self.hb is not None and self.hb.returncode is None:
                self.hb.kill()
                await self.hb.wait()
            for t in list(self._tasks):
                t.cancel()

    async def _start_volume(self, rt: VolumeRuntime) -> None:
        try:
            await rt.start()
        except Exception as err:
            log.exception("volume %s could not start on %s: %s", rt.name, self.name, err)
            self.event("volume", volume=rt.name, error=str(err))

    async def _claim_control_socket(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            try:
                r, w = await asyncio.open_unix_connection(str(path))
                w.close()
                raise AgentAlreadyRunning(
                    f"an agent for node {self.name} is already running (control socket {path})."
                )
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)  # left by an agent that died

    async def _start_heartbeatd(self) -> None:
        setup = Setup(
            cluster=self.cfg.name,
            node=self.name,
            node_id=self.me.id,
            key=self.hb_key,
            port=self.cfg.heartbeat_port,
            timing=self.cfg.timing,
            addresses=dict(self.me.addresses),
            peers=[Peer(p.name, p.id, dict(p.addresses)) for p in self.peers],
            enabled=set(self.enabled_networks()),
            blocked=set(self.blocked),
        )
        self.hb = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal.netft.heartbeatd",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 22,
        )
        await self._hb_send(setup.to_json())
        self._spawn(self._read_heartbeatd())

    async def _read_heartbeatd(self) -> None:
        assert self.hb is not None and self.hb.stdout is not None
        while True:
            line = await self.hb.stdout.readline()
            if not line:
                return
            try:
                self._on_event(json.loads(line))
            except Exception:
                log.exception("bad event from heartbeat process: %r", line[:200])

    # -- heartbeat events -----------------------------------------------------

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "ready":
            self.priority = str(ev.get("priority"))
            log.info("heartbeat process %s runs at %s", ev.get("pid"), self.priority)
        elif kind == "link":
            peer, net = ev["peer"], ev["network"]
            last = self.links.get((peer, net), (LinkState.DOWN, None))[1]
            self.links[(peer, net)] = (LinkState(ev["new"]), last)
            log.info("link to %s on %s: %s -> %s", peer, net, ev["old"], ev["new"])
            self.event("link", peer=peer, network=net, old=ev["old"], new=ev["new"])
            self._reevaluate(peer)
        elif kind == "snapshot":
            changed = set()
            for peer, net, state, last_rx in ev["links"]:
                old = self.links.get((peer, net), (LinkState.DOWN, None))[0]
                self.links[(peer, net)] = (LinkState(state), last_rx)
                if old.value != state:
                    changed.add(peer)
            for peer in changed:
                self._reevaluate(peer)
        elif kind == "refused":
            claims = f" claiming to be {ev['claims']}" if ev.get("claims") else ""
            log.warning(
                "refused heartbeats on %s from %s%s: %s (it does not hold the secret of cluster %s)",
                ev["network"], ev["source"], claims, ev["reason"], self.cfg.name,
            )
            self.event("refused", network=ev["network"], source=ev["source"], claims=ev.get("claims"),
                       reason=ev["reason"])
        elif kind == "error":
            log.error("heartbeat process: %s", ev.get("message"))

    def _peer_up_map(self, peer: str) -> dict[str, bool]:
        return {
            net: self.links.get((peer, net), (LinkState.DOWN, None))[0] is LinkState.UP
            for net in self.metrics
        }

    def _reevaluate(self, peer: str) -> None:
        if peer not in self.routes:
            return
        up = self._peer_up_map(peer)
        new = choose_route(self.metrics, up)
        old = self.routes[peer]
        if new != old:
            self.routes[peer] = new
            log.warning(
                "route to %s: internal traffic %s -> %s, live migration %s -> %s",
                peer, old.internal, new.internal, old.migration, new.migration,
            )
            self.event("route", peer=peer, internal=new.internal, migration=new.migration)
        self.membership.update(peer, any(up.values()), disk_alive=self._disk_alive(peer))

    def set_disk_alive(self, peer: str, until: float) -> None:
        """A volume judged ``peer``'s liveness slot: it counts as advancing until
        ``until`` (monotonic clock; SlotWatcher.fresh_until). Re-judge its membership
        (a state it already has changes nothing)."""
        self.disk_alive[peer] = until
        up = self._peer_up_map(peer)
        self.membership.update(peer, any(up.values()), disk_alive=self._disk_alive(peer))

    def _disk_alive(self, peer: str) -> bool | None:
        """Is ``peer``'s slot advancing now? None if no volume judged it. A deadline, not
        the last judgement, so a judge that runs late (a loaded machine) cannot make a
        peer whose heartbeats just stopped look alive on disk."""
        until = self.disk_alive.get(peer)
        return None if until is None else time.monotonic() < until

    def _on_node_change(self, node: str, old: NodeState, new: NodeState) -> None:
        self.event("node", node=node, old=old.value, new=new.value)
        if new is NodeState.UP:
            self._spawn(self._config_sync(node))
        else:
            for key in [k for k in self.conns if k[0] == node]:
                self.conns.pop(key).close()
        for rt in self.volumes.values():
            rt.refresh_state(f"{node} is {new.value}")

    # -- agent channel (client side) ----------------------------------------------

    def peer_address(self, peer: str, network: str) -> str | None:
        return self.cfg.node(peer).addresses.get(network)

    async def call_peer(self, peer: str, op: str, args: dict[str, Any] | None = None,
                        payload: bytes = b"", *, lane: int = 0,
                        timeout_s: float | None = None) -> tuple[Any, bytes, str]:
        """Call ``op`` on ``peer`` over internal traffic's route, failing over network by network.

        ``lane`` picks one of several connections to the peer (one call at a time runs on
        each), so block I/O, metadata and control requests do not queue behind each other.
        Returns (result, payload, network used).
        """
        order = [n for n in failover_order(self.metrics, self._peer_up_map(peer)) if n not in self.blocked]
        t = self.cfg.timing
        errors = []
        for net in order:
            addr = self.peer_address(peer, net)
            if addr is None:
                continue
            conn = self.conns.get((peer, net, lane))
            if conn is not None and conn.closed:
                self._drop_conn(peer, net, conn, lane)
                conn = None
            try:
                if conn is None:
                    async with asyncio.timeout(t.rpc_connect_timeout_s):
                        conn = await Connection.open(self.cfg.name, self.name, self.ch_key, peer, net,
                                                     addr, self.cfg.rpc_port)
                    self.conns[(peer, net, lane)] = conn
                async with asyncio.timeout(timeout_s or t.rpc_call_timeout_s):
                    result, data = await conn.call(op, args or {}, payload)
                return result, data, net
            except (OSError, TimeoutError, ConnectionError, RemoteProtocolError) as err:
                errors.append(f"{net}: {err or type(err).__name__}")
                self._drop_conn(peer, net, conn, lane)
            except AuthenticationFailed:
                self._drop_conn(peer, net, conn, lane)
                raise
            except BaseException:
                # cancelled (the caller's timeout) mid-call: Connection.call closed it
                if conn is not None and conn.closed:
                    self._drop_conn(peer, net, conn, lane)
                raise
        raise PeerUnreachable(f"{peer} did not answer on any network ({'; '.join(errors) or 'no route'}).")

    def open_lane(self, peer: str, lane: int) -> Connection | None:
        """The open connection of ``lane`` to ``peer`` on the network :meth:`call_peer`
        would try first; None when that one is not open now."""
        for net in failover_order(self.metrics, self._peer_up_map(peer)):
            if net in self.blocked or self.peer_address(peer, net) is None:
                continue
            conn = self.conns.get((peer, net, lane))
            return conn if conn is not None and not conn.closed else None
        return None

    def _drop_conn(self, peer: str, net: str, conn: Connection | None, lane: int = 0) -> None:
        """Forget and close a pooled connection (only this one, not a newer replacement)."""
        if conn is None:
            return
        if self.conns.get((peer, net, lane)) is conn:
            del self.conns[(peer, net, lane)]
        conn.close()

    async def _auth_probe_loop(self) -> None:
        """Probe peers that are not up, so a wrong secret is noticed and said."""
        while True:
            for p in self.peers:
                if self.membership.state(p.name) is NodeState.UP:
                    continue
                try:
                    await self.call_peer(p.name, "hello", {"generation": self.cfg.generation})
                    self.auth_failures.pop(p.name, None)
                except AuthenticationFailed as err:
                    self.auth_failures[p.name] = str(err)
                    last = self.auth_logged.get(p.name)
                    if last is None or time.monotonic() - last > AUTH_LOG_INTERVAL_S:
                        self.auth_logged[p.name] = time.monotonic()
                        log.error("cannot join %s: %s", p.name, err)
                        self.event("auth", peer=p.name, error=str(err))
                except NetftError:
                    pass
                except Exception:  # a bug or a peer we did not foresee: log, keep probing
                    log.exception("probing %s failed", p.name)
            await asyncio.sleep(AUTH_PROBE_INTERVAL_S)

    async def _config_sync(self, peer: str) -> None:
        try:
            result, _, _ = await self.call_peer(peer, "config_sync", self._networks_msg())
        except NetftError as err:
            log.info("configuration sync with %s failed: %s", peer, err)
            return
        if is_newer(result, self._networks_msg()):
            await self._apply_networks(result, source=peer)

    def _networks_msg(self) -> dict[str, Any]:
        return {"generation": self.cfg.generation, "networks": [n.to_dict() for n in self.cfg.networks]}

    # -- agent channel (server side) ----------------------------------------------

    async def _sync_channel_servers(self) -> None:
        enabled = set(self.enabled_networks()) - self.blocked
        for net in list(self.channel.servers):
            if net not in enabled:
                self.channel.close(net)
        for net in sorted(enabled):
            try:
                await self.channel.listen(net, self.me.addresses[net], self.cfg.rpc_port)
            except OSError as err:
                log.error("cannot listen for agents on %s port %d (network %s): %s",
                          self.me.addresses[net], self.cfg.rpc_port, net, err.strerror)

    async def _peer_request(
        self, peer: str, op: str, args: dict[str, Any], payload: bytes | Piped
    ) -> tuple[Any, bytes | Piped]:
        if op == "hello":
            return {"node": self.name, "generation": self.cfg.generation}, b""
        if op == "view":
            return self.local_view(), b""
        if op == "config_sync":
            if is_newer(args, self._networks_msg()):
                await self._apply_networks(args, source=peer)
            return self._networks_msg(), b""
        if op == "ping":
            return {"node": self.name}, drain_pipe(payload) if isinstance(payload, Piped) else payload
        if op.startswith("csv."):
            return await volume_ops.peer_request(self, peer, op, args, payload)
        if op.startswith("vm."):
            return await vm_ops.peer_request(self, peer, op, args), b""
        raise RemoteError(f"unknown request {op!r}")

    async def _apply_networks(self, msg: dict[str, Any], source: str) -> None:
        if not is_newer(msg, self._networks_msg()):
            return
        gen = int(msg["generation"])
        nets = tuple(network_from_dict(d) for d in msg["networks"])
        await self._set_networks(nets, gen)
        log.warning("networks updated to generation %d from %s", gen, source)

    async def _set_networks(self, nets: tuple[Network, ...], generation: int) -> None:
        new_cfg = self.cfg.with_networks(nets, generation)
        self.cfg = new_cfg
        self.metrics = assign_metrics(new_cfg.networks)
        write_config(new_cfg, self.config_path)
        for p in self.peers:
            self._reevaluate(p.name)  # routes re-evaluated at once
        await self._hb_send({"cmd": "enable", "networks": self.enabled_networks()})
        await self._sync_channel_servers()
        self.event("config", generation=generation)

    # -- control socket -------------------------------------------------------

    async def _control_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await r.readline()
            if not line:
                return
            req = json.loads(line)
            op = req.pop("op", None)
            handler = getattr(self, f"control_{op}", None) if isinstance(op, str) else None
            if handler is None:
                answer: dict[str, Any] = {"ok": False, "error": f"the agent does not know the request {op!r}."}
            else:
                try:
                    answer = {"ok": True, "result": await handler(**req)}
                except (AgentError, NetftError) as err:
                    answer = {"ok": False, "error": str(err)}
                except Exception as err:
                    from shoal.errors import ShoalError

                    if not isinstance(err, ShoalError):
                        log.exception("control request %s failed", op)
                    answer = {"ok": False, "error": str(err)}
            w.write((json.dumps(answer) + "\n").encode())
            await w.drain()
        except (OSError, ValueError):
            pass
        finally:
            w.close()

    def local_view(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes: dict[str, Any] = {}
        for n in self.cfg.nodes:
            links = {}
            if n.name != self.name:
                for net in self.metrics:
                    state, last_rx = self.links.get((n.name, net), (LinkState.DOWN, None))
                    links[net] = {
                        "state": state.value,
                        "last_seen_s": None if last_rx is None else round(now - last_rx, 3),
                    }
            nodes[n.name] = {
                "state": self.membership.state(n.name).value,
                "since_s": round(now - self.membership.since[n.name], 3),
                "links": links,
                "paused": n.name in self.vms.paused_nodes,
            }
        return {
            "node": self.name,
            "cluster": self.cfg.name,
            "generation": self.cfg.generation,
            "nodes": nodes,
            "routes": {p: r.to_dict() for p, r in self.routes.items()},
            "metrics": {k: {"value": m.value, "auto": m.auto} for k, m in self.metrics.items()},
            "heartbeat_priority": self.priority,
            "blocked": sorted(self.blocked),
            "auth_failures": dict(self.auth_failures),
            "uptime_s": round(now - self.started, 1),
        }

    async def control_status(self) -> dict[str, Any]:
        return self.local_view()

    async def control_events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events if e["t"] >= since]

    async def control_cluster_view(self) -> dict[str, Any]:
        """This node's view plus every reachable peer's, for ``network ls``."""
        views: dict[str, Any] = {self.name: self.local_view()}

        async def one(peer: str) -> None:
            try:
                async with asyncio.timeout(PEER_VIEW_TIMEOUT_S):
                    result, _, _ = await self.call_peer(peer, "view")
                views[peer] = result
            except (NetftError, TimeoutError):
                pass

        await asyncio.gather(*(one(p.name) for p in self.peers
                               if self.membership.state(p.name) is NodeState.UP))
        return {"views": views, "networks": [n.to_dict() for n in self.cfg.networks]}

    async def control_network_set(self, name: str, role: str | None = None,
                                  metric: int | str | None = None) -> dict[str, Any]:
        net = self.cfg.network(name)
        new = net
        if role is not None:
            new = replace(new, role=Role(role))
        if metric is not None:
            new = replace(new, metric=None if metric == "auto" else int(metric))
        nets = tuple(new if n.name == name else n for n in self.cfg.networks)
        await self._set_networks(nets, self.cfg.generation + 1)
        log.warning("network %s set to role %s, metric %s (generation %d)", name, new.role,
                    new.metric or "auto", self.cfg.generation)
        reached, missed = [], []

        async def push(peer: str) -> None:
            try:
                await self.call_peer(peer, "config_sync", self._networks_msg())
                reached.append(peer)
            except NetftError:
                missed.append(peer)

        await asyncio.gather(*(push(p.name) for p in self.peers))
        return {"network": new.to_dict(), "generation": self.cfg.generation,
                "reached": sorted(reached), "missed": sorted(missed)}

    async def control_block(self, networks: list[str]) -> dict[str, Any]:
        """In-process link fault (lab without root): drop heartbeats and agent traffic."""
        self.blocked = set(networks)
        for key in [k for k in self.conns if k[1] in self.blocked]:
            self.conns.pop(key).close()
        await self._hb_send({"cmd": "block", "networks": sorted(self.blocked)})
        await self._sync_channel_servers()
        return {"blocked": sorted(self.blocked)}

    async def control_ping(self, peer: str) -> dict[str, Any]:
        t0 = time.monotonic()
        _, _, net = await self.call_peer(peer, "ping")
        return {"peer": peer, "network": net, "rtt_ms": round((time.monotonic() - t0) * 1000, 3)}

    # -- shared volumes (control socket) ------------------------------------------

    async def control_volume_ls(self) -> list[dict[str, Any]]:
        return await volume_ops.cluster_views(self)

    async def control_volume_move(self, volume: str, to: str) -> Any:
        self.cfg.node(to)  # a clear error for an unknown node
        return await volume_ops.forward_to_coordinator(volume_ops.runtime(self, volume), "csv.move", {"to": to})

    async def control_volume_maintenance(self, volume: str, on: bool) -> Any:
        return await volume_ops.forward_to_coordinator(volume_ops.runtime(self, volume), "csv.maintenance_set",
                                                       {"on": bool(on)})

    async def control_volume_repair(self, volume: str, kind: str) -> Any:
        return await volume_ops.forward_to_coordinator(volume_ops.runtime(self, volume), "csv.repair",
                                                       {"kind": kind})

    async def control_file(self, volume: str, fop: str, fargs: dict[str, Any]) -> Any:
        """A metadata request for ``shoal file ... VOLUME:/path`` (sent to the coordinator)."""
        from shoal.coordinator import messages

        rt = volume_ops.runtime(self, volume)
        return messages.check_result(await rt._meta_call(fop, fargs))

    async def control_nbd_path(self, volume: str, file: str) -> dict[str, Any]:
        rt = volume_ops.runtime(self, volume)
        export = file.strip("/")
        return {"uri": f"nbd+unix:///{export}?socket={rt.socket_path}", "socket": str(rt.socket_path),
                "export": export, "volume": volume, "node": self.name}

    async def control_volume_probe_alloc(self, volume: str, file: str, count: int = 100) -> dict[str, Any]:
        """Measure allocation round trips from this node: allocate the first ``count``
        units of a sparse file, one request each, the way a write into a hole does."""
        from shoal.coordinator import messages

        rt = volume_ops.runtime(self, volume)
        st = messages.check_result(await rt._meta_call("stat", {"path": file}))
        unit = rt.sb.unit_size if rt.sb else 1 << 20
        if int(st["size"]) < count * unit:
            raise AgentError(f"{file} is smaller than {count} allocation units; make it larger.")
        lat = []
        for i in range(count):
            t0 = time.perf_counter()
            await rt.maps.request("allocate", {"ino": int(st["ino"]), "offset": i * unit, "length": 4096})
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        return {"count": count, "coordinator": rt.coordinator, "p50_ms": round(lat[len(lat) // 2], 3),
                "p90_ms": round(lat[int(len(lat) * 0.9)], 3), "max_ms": round(lat[-1], 3)}

    # -- VMs (control socket) ------------------------------------------------------

    async def control_vm_create(self, spec: dict[str, Any], start: bool = False) -> Any:
        return await vm_ops.create(self, spec, start)

    async def control_vm_ls(self) -> Any:
        return await vm_ops.list_vms(self)

    async def control_vm_start(self, name: str, on: str | None = None) -> Any:
        return await vm_ops.start_vm(self, name, on)

    async def control_vm_stop(self, name: str, force: bool = False) -> Any:
        return await vm_ops.stop_vm(self, name, force)

    async def control_vm_delete(self, name: str) -> Any:
        return await vm_ops.delete_vm(self, name)

    async def control_vm_console(self, name: str, offset: int = -1) -> Any:
        return await vm_ops.forward_vm(self, name, "vm.console", {"offset": offset})

    async def control_vm_verify(self, name: str) -> Any:
        return await vm_ops.forward_vm(self, name, "vm.verify", {})

    async def control_vm_migrate(self, name: str, to: str, quick: bool = False, network: str | None = None,
                                 bandwidth: int | None = None) -> Any:
        self.cfg.node(to)
        return await vm_ops.forward_vm(self, name, "vm.migrate",
                                       {"to": to, "quick": quick, "network": network, "bandwidth": bandwidth})

    async def control_node_drain(self, node: str) -> Any:
        return await vm_ops.drain_node(self, node)

    async def control_node_resume(self, node: str) -> Any:
        self.cfg.node(node)
        return {"node": node, "paused_nodes": await self.vms.set_paused(node, False)}
