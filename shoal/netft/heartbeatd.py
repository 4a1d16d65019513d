"""The liveness process: heartbeats on every cluster network, link states.

It runs apart from the node agent (``python -m shoal.netft.heartbeatd``, a child
of the agent in the agent's process group) so that heartbeat timing does not
depend on whatever bulk work the agent does: it owns only small UDP sockets
and timers, asks for SCHED_RR real-time priority when it runs as root (a nice
level otherwise), freezes its heap out of the garbage collector after setup,
and judges every deadline on the monotonic clock.

Pipe protocol with the agent, one JSON object per line:

    agent -> heartbeatd   first line: the setup (see ``Setup``); then commands
                          {"cmd": "enable", "networks": [...]}  heartbeat on these
                          {"cmd": "block", "networks": [...]}   in-process link fault
    heartbeatd -> agent   {"ev": "ready", "priority": sentence}
                          {"ev": "link", "peer", "network", "old", "new", "t"}
                          {"ev": "snapshot", "t", "links": [[peer, net, state, last_rx], ...]}
                          {"ev": "refused", "network", "source", "claims", "reason"}
                          {"ev": "error", "message"}

The agent and this process share the host's monotonic clock, so ``last_rx``
values are comparable with the agent's ``time.monotonic()``.
The process exits when its stdin closes (the agent is gone).

Replay protection: every heartbeat carries the sender's boot id and a sequence
number. The boot id is the sender's wall-clock time in nanoseconds when its
heartbeatd started, so boots are ordered: a receiver accepts a heartbeat only if
(boot id, seq) is greater than the last pair it accepted from that peer on that
network. Captured heartbeats from earlier boots, replayed in any order, are
ignored. Edge case: a peer whose wall clock went backwards across a restart is
not heard until its clock passes the value of its previous start (or until this
process restarts and forgets the old value).

The UDP sockets are bound without SO_REUSEADDR, so no other local process can
bind the same address and port to steal unicast heartbeats.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.config.timing import Timing
from shoal.netft.links import Link, LinkState
from shoal.netft.protocol import (
    BadHeartbeat,
    Heartbeat,
    decode_heartbeat,
    encode_heartbeat,
    network_tag,
)

log = logging.getLogger("shoal.netft.heartbeatd")

REFUSAL_LOG_INTERVAL_S = 30.0
SNAPSHOT_INTERVAL_S = 1.0


@dataclass
class Peer:
    name: str
    id: int
    addresses: dict[str, str]


@dataclass
class Setup:
    cluster: str
    node: str
    node_id: int
    key: bytes
    port: int
    timing: Timing
    addresses: dict[str, str]
    peers: list[Peer]
    enabled: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Setup:
        return cls(
            cluster=d["cluster"],
            node=d["node"],
            node_id=int(d["node_id"]),
            key=bytes.fromhex(d["key_hex"]),
            port=int(d["port"]),
            timing=Timing(**d["timing"]),
            addresses=dict(d["addresses"]),
            peers=[Peer(p["name"], int(p["id"]), dict(p["addresses"])) for p in d["peers"]],
            enabled=set(d.get("enabled", [])),
            blocked=set(d.get("blocked", [])),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "node": self.node,
            "node_id": self.node_id,
            "key_hex": self.key.hex(),
            "port": self.port,
            "timing": self.timing.to_dict(),
            "addresses": self.addresses,
            "peers": [{"name": p.name, "id": p.id, "addresses": p.addresses} for p in self.peers],
            "enabled": sorted(self.enabled),
            "blocked": sorted(self.blocked),
        }


def raise_priority() -> str:
    """Best effort; returns a sentence saying what we got."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        return "SCHED_RR priority 10"
    except (PermissionError, OSError, AttributeError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except (PermissionError, OSError):
        return "normal priority (not root: could not raise it)"


def is_fresh(prev: tuple[int, int] | None, boot_id: int, seq: int) -> bool:
    """Whether a heartbeat (boot_id, seq) is newer than the last one accepted.

    Boot ids are ordered (wall-clock ns at the sender's start), so a heartbeat
    from an older boot of the peer is a replay, never a restart.
    """
    return prev is None or (boot_id, seq) > prev


class _NetProtocol(asyncio.DatagramProtocol):
    def __init__(self, daemon: Heartbeatd, network: str):
        self.daemon = daemon
        self.network = network

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.daemon.on_datagram(self.network, data, addr[0])

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable and the like: the missing heartbeats say it already
        pass


class Heartbeatd:
    def __init__(self, setup: Setup, out: asyncio.WriteTransport | None):
        self.s = setup
        self.out = out
        # ordered boot id: the wall clock at process start, in ns (see the module doc)
        self.boot_id = time.time_ns()
        self.seq = 0
        self.by_id = {p.id: p for p in setup.peers}
        self.links: dict[tuple[str, str], Link] = {}
        self.transports: dict[str, asyncio.DatagramTransport] = {}
        self.last_seen_seq: dict[tuple[int, str], tuple[int, int]] = {}
        self.last_refusal_log: dict[tuple[str, str], float] = {}
        self.tags = {net: network_tag(net) for net in setup.addresses}
        for p in setup.peers:
            for net in p.addresses:
                if net in setup.addresses:
                    self.links[(p.name, net)] = Link(p.name, net, setup.timing, self._on_change)

    # -- output ---------------------------------------------------------------

    def emit(self, ev: dict[str, Any]) -> None:
        if self.out is not None and not self.out.is_closing():
            self.out.write((json.dumps(ev, separators=(",", ":")) + "\n").encode())

    def _on_change(self, link: Link, old: LinkState, new: LinkState) -> None:
        self.emit(
            {"ev": "link", "peer": link.peer, "network": link.network, "old": old.value,
             "new": new.value, "t": time.monotonic()}
        )

    def snapshot(self) -> None:
        self.emit(
            {"ev": "snapshot", "t": time.monotonic(),
             "links": [[k[0], k[1], v.state.value, v.last_rx] for k, v in self.links.items()]}
        )

    # -- sockets --------------------------------------------------------------

    async def sync_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for net in list(self.transports):
            if net not in self.s.enabled:
                self.transports.pop(net).close()
                for (_, n), link in self.links.items():
                    if n == net and link.state is not LinkState.DOWN:
                        link.last_rx = None
                        link.on_tick(time.monotonic())
        for net in sorted(self.s.enabled):
            if net in self.transports or net not in self.s.addresses:
                continue
            addr = self.s.addresses[net]
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
                # no SO_REUSEADDR: on UDP it would let any local process bind the same
                # address and port and take our unicast heartbeats
                # network control class: ahead of bulk traffic in qdiscs that look
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)
                sock.bind((addr, self.s.port))
            except OSError as err:
                self.emit({"ev": "error", "message":
                           f"cannot listen for heartbeats on {addr} port {self.s.port} "
                           f"(network {net}): {err.strerror}"})
                continue
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_NetProtocol, self, net), sock=sock
            )
            self.transports[net] = transport

    # -- heartbeats -----------------------------------------------------------

    def send_all(self) -> None:
        now = time.monotonic()
        for net, transport in self.transports.items():
            if net in self.s.blocked:
                continue
            tag = self.tags[net]
            for p in self.s.peers:
                dest = p.addresses.get(net)
                link = self.links.get((p.name, net))
                if dest is None or link is None:
                    continue
                self.seq += 1
                hb = Heartbeat(self.s.node_id, p.id, tag, link.hears(now), self.boot_id, self.seq)
                try:
                    transport.sendto(encode_heartbeat(hb, self.s.key), (dest, self.s.port))
                except OSError:
                    pass  # link down in the kernel: missed heartbeats say it

    def on_datagram(self, net: str, data: bytes, source: str) -> None:
        if net in self.s.blocked or net not in self.s.enabled:
            return
        now = time.monotonic()
        try:
            hb = decode_heartbeat(data, self.s.key)
        except BadHeartbeat as err:
            claimed = self.by_id.get(err.sender) if err.sender is not None else None
            self.refuse(net, source, claimed.name if claimed else None, err.reason, now)
            return
        peer = self.by_id.get(hb.sender)
        if hb.receiver != self.s.node_id or hb.network_tag != self.tags[net] or peer is None:
            self.refuse(net, source, peer.name if peer else None,
                        "heartbeat addressed to another node or network", now)
            return
        if peer.addresses.get(net) != source:
            self.refuse(net, source, peer.name, f"{peer.name} is not at {source} on {net}", now)
            return
        key = (hb.sender, net)
        if not is_fresh(self.last_seen_seq.get(key), hb.boot_id, hb.seq):
            return  # replayed, reordered or from an older boot: ignore silently
        self.last_seen_seq[key] = (hb.boot_id, hb.seq)
        link = self.links.get((peer.name, net))
        if link is not None:
            link.on_heartbeat(now, hb.hears_you)

    def refuse(self, net: str, source: str, claims: str | None, reason: str, now: float) -> None:
        k = (source, net)
        last = self.last_refusal_log.get(k)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            return
        self.last_refusal_log[k] = now
        self.emit({"ev": "refused", "network": net, "source": source, "claims": claims,
                   "reason": reason})

    def tick(self, now: float) -> None:
        for link in self.links.values():
            link.on_tick(now)

    # -- commands -------------------------------------------------------------

    async def command(self, cmd: dict[str, Any]) -> None:
        if cmd.get("cmd") == "enable":
            self.s.enabled = set(cmd["networks"])
            await self.sync_sockets()
        elif cmd.get("cmd") == "block":
            self.s.blocked = set(cmd["networks"])
        self.snapshot()

    # -- main loop ------------------------------------------------------------

    async def run(self, commands: asyncio.StreamReader) -> None:
        await self.sync_sockets()
        gc.collect()
        gc.freeze()
        interval = self.s.timing.heartbeat_interval_s
        tick = self.s.timing.tick_s
        next_send = time.monotonic()
        next_snap = next_send
        reader = asyncio.ensure_future(commands.readline())
        while True:
            now = time.monotonic()
            if now >= next_send:
                self.send_all()
                next_send += interval
                if next_send < now:  # we were stopped (SIGSTOP) or starved: resync
                    next_send = now + interval
            self.tick(now)
            if now >= next_snap:
                self.snapshot()
                next_snap = now + SNAPSHOT_INTERVAL_S
            timeout = max(0.0, min(next_send, now + tick) - time.monotonic())
            done, _ = await asyncio.wait({reader}, timeout=timeout)
            if reader in done:
                line = reader.result()
                if not line:
                    return  # the agent is gone
                try:
                    await self.command(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:
                    self.emit({"ev": "error", "message": f"bad command from agent: {err}"})
                reader = asyncio.ensure_future(commands.readline())


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, sys.stdout)
    first = await reader.readline()
    if not first:
        return
    setup = Setup.from_json(json.loads(first))
    priority = raise_priority()
    d = Heartbeatd(setup, out)
    d.emit({"ev": "ready", "priority": priority, "pid": os.getpid()})
    await d.run(reader)


def main() -> None:
    # Ctrl-C on ``shoal node run`` and systemd's stop signal reach the whole group;
    # this process goes when the agent does (its stdin closes), never before it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s heartbeatd %(levelname)s %(message)s")
    try:
        asyncio.run(_main())
    except (KeyboardInterrupt, BrokenPipeError):
        pass


if __name__ == "__main__":
    main()
