"""Build, inspect, break and remove a lab.

Layout (network namespaces mode, as root)::

    shoal-<name>-sw        the "switch": one bridge per network (br1, br2, …),
                           the storage target (shoal nbd serve) on the storage bridge
    shoal-<name>-node<i>   one per host: lo plus one interface per network, named
                           after the network, e.g. "cluster" = 198.18.1.<i>/24
    <dir>/                 cluster.toml, cluster.secret, lun0.img (sparse, formatted
                           as volume vol1), lab.json (what was made), logs/, run/
                           (control sockets)

Network k (1-based, declaration order) is 198.18.k.0/24; node i is .i; the
storage target is .250 on the storage network, and serves lun0.img as NBD export
``lun0`` with fencing (register/preempt, docs/NBD.md). Neighbour entries on the
storage network are static, so a long ``hold`` cannot make ARP give up.
Nothing is added to the root namespace except the namespaces themselves, so
``down`` finds every leftover by its name prefix even when lab.json is gone.

Without root (or with ``loopback=True``) the hosts share the loopback
interface: node i on network k is 127.<o>.k.i, where o is derived from the lab
name, and a link fault is an in-process switch in the agent (it drops that
network's heartbeats and agent traffic). ``hold`` needs namespaces.

``hold link`` queues what a node sends on one interface until ``release link``
delivers it late (see ``shoal.lab.hold``); ``fail link`` takes the link down.

Every agent is started in its own session (process group = its pid), so
``kill`` and ``freeze`` reach it and everything it started; in namespace mode
they also reach every process left in the node's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.agent.control import request
from shoal.agent.errors import AgentError
from shoal.config.cli import make_config, write_secret
from shoal.config.model import Role, write_config
from shoal.config.volumes import VolumeConfig
from shoal.lab import netns, procs
from shoal.lab.errors import LabError, LabExists, LabNotFound, LabToolError
from shoal.lab.hold import hold_device
from shoal.volume.format import format_volume

LAB_NETWORKS = (
    ("cluster", Role.CLUSTER),
    ("public", Role.CLUSTER_AND_CLIENT),
    ("migration", Role.CLUSTER),
    ("storage", Role.NONE),
)
STORAGE_NETWORK = "storage"
TARGET_HOST = 250
NBD_PORT = 10809
LUN_SIZE = 4 << 30
LUN_EXPORT = "lun0"
VOLUME_NAME = "vol1"
AGENT_START_TIMEOUT_S = 30.0
TARGET_START_TIMEOUT_S = 20.0
HOLD_TIMEOUT_S = 60.0
MAX_NODES = 200
#: every lab host (each node and the switch) is a LAN host with the kernel's defaults,
#: whatever the machine running the lab chose for itself: IPv4 only, and cubic, not
#: BBR (some images set BBR machine-wide; its pacing, meant for WAN paths, leaves the
#: CPUs idle between the bursts of a sub-millisecond LAN: 1 MiB reads through the
#: coordinator took 0.59-0.78 s per 512 MiB with BBR against 0.42-0.45 s with cubic,
#: and BBR slowed qemu-nbd's small requests too; docs/LAB.md). A new namespace starts
#: with the machine's choice, so it is set here.
LAB_HOST_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv4.tcp_congestion_control": "cubic",
}
#: the switch forwards frames as a switch does: not through the machine's iptables
#: (br_netfilter, when some other program loaded it, would run them on every frame)
LAB_SWITCH_SYSCTLS = {
    "net.bridge.bridge-nf-call-iptables": "0",
    "net.bridge.bridge-nf-call-ip6tables": "0",
    "net.bridge.bridge-nf-call-arptables": "0",
}


def lab_mac(node_index: int, network_index: int) -> str:
    """Locally administered MAC of node i's interface on network k (unique inside one lab)."""
    return f"02:53:{network_index:02x}:00:{node_index >> 8:02x}:{node_index & 0xFF:02x}"


def default_dir() -> Path:
    env = os.environ.get("SHOAL_LAB_DIR")
    if env:
        return Path(env)
    return Path("/tmp/shoal-lab") if os.geteuid() == 0 else Path(f"/tmp/shoal-lab-{os.getuid()}")


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class LabState:
    name: str
    dir: str
    mode: str  # "netns" | "loopback"
    nodes: list[str]
    networks: list[str]
    agents: dict[str, int] = field(default_factory=dict)
    target_pid: int | None = None
    target: str = ""
    blocked: dict[str, list[str]] = field(default_factory=dict)
    timing: str = "default"

    @property
    def prefix(self) -> str:
        return f"shoal-{self.name}-"

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    @property
    def config(self) -> Path:
        return Path(self.dir) / "cluster.toml"

    @property
    def image(self) -> Path:
        return Path(self.dir) / "lun0.img"

    @property
    def target_log(self) -> Path:
        return Path(self.dir) / "logs" / "storage-target.log"


class Lab:
    def __init__(self, directory: str | os.PathLike[str] | None = None):
        # absolute: the config written here names files relative to its own directory
        self.dir = Path(directory).resolve() if directory else default_dir()
        self.state_file = self.dir / "lab.json"

    # -- state ----------------------------------------------------------------

    def load(self) -> LabState:
        try:
            return LabState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError as err:
            raise LabNotFound(f"no lab in {self.dir}; start one with 'shoal lab up --nodes 3'.") from err

    def save(self, st: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=2))
        os.replace(tmp, self.state_file)

    def node_state(self, st: LabState, node: str) -> None:
        if node not in st.nodes:
            raise LabError(f"the lab has no node {node!r}; its nodes are {', '.join(st.nodes)}.")

    # -- up -------------------------------------------------------------------

    def up(self, nodes: int, *, name: str = "lab", loopback: bool | None = None,
           timing: str = "default", say: Any = print) -> LabState:
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"--nodes must be between 1 and {MAX_NODES}.")
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise LabError("the lab name must be letters, digits and dashes, at most 20 characters.")
        if self.state_file.exists():
            raise LabExists(f"a lab is already in {self.dir}; run 'shoal lab down --dir {self.dir}' first.")
        if loopback is None:
            loopback = not is_root()
            if loopback:
                say("not root: the lab runs on loopback addresses with in-process link faults "
                    "(no namespaces, no real link down)")
        elif not loopback and not is_root():
            raise LabError("a lab with network namespaces needs root; run as root or pass --loopback.")
        mode = "loopback" if loopback else "netns"
        octet = 100 + zlib.crc32(name.encode()) % 100
        base = f"127.{octet}.0.0" if loopback else "198.18.0.0"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        cfg = make_config(name, nodes, base=base, networks=LAB_NETWORKS, run_dir=str(self.dir / "run"),
                          timing=timing)
        storage = cfg.network(STORAGE_NETWORK)
        target_ip = str(storage.subnet.network_address + TARGET_HOST)
        lun_url = f"nbd://{target_ip}:{NBD_PORT}/{LUN_EXPORT}"
        from dataclasses import replace

        cfg = replace(cfg, secret_file=self.dir / "cluster.secret",
                      volumes=(VolumeConfig(VOLUME_NAME, lun_url),))
        write_secret(self.dir / "cluster.secret")
        write_config(cfg, self.dir / "cluster.toml")
        st = LabState(name=name, dir=str(self.dir), mode=mode, nodes=[n.name for n in cfg.nodes],
                      networks=[n.name for n in cfg.networks], target=lun_url, timing=timing)
        self.save(st)
        try:
            if mode == "netns":
                self._build_netns(st, cfg)
            self._make_lun(st)
            self._start_target(st, target_ip)
            self.save(st)
            self._wait_target(st, target_ip)
            for node in st.nodes:
                self._start_agent(st, node)
            self.save(st)
            self._wait_agents(st)
        except BaseException:
            self.save(st)
            raise
        return st

    def _build_netns(self, st: LabState, cfg: Any) -> None:
        if netns.list_netns(st.prefix):
            raise LabExists(f"namespaces {st.prefix}* already exist; run 'shoal lab down --name {st.name}' first.")
        netns.batch([f"netns add {st.switch}"] + [f"netns add {st.ns(n)}" for n in st.nodes])
        for ns in [st.switch, *(st.ns(n) for n in st.nodes)]:
            netns.sysctl_in(ns, LAB_HOST_SYSCTLS)
        netns.sysctl_in(st.switch, LAB_SWITCH_SYSCTLS)
        sw = ["link set lo up"]
        for k, net in enumerate(cfg.networks, 1):
            sw.append(f"link add br{k} type bridge forward_delay 0 stp_state 0")
            sw.append(f"link set br{k} up")
            if net.name == STORAGE_NETWORK:
                host = net.subnet.network_address + TARGET_HOST
                # a fixed address: a bridge otherwise takes its lowest port's, which changes
                sw.append(f"link set br{k} address {lab_mac(TARGET_HOST, k)}")
                sw.append(f"addr add {host}/{net.subnet.prefixlen} dev br{k}")
        for i, node in enumerate(st.nodes, 1):
            for k, net in enumerate(cfg.networks, 1):
                ifname = net.name[:15]
                sw.append(f"link add n{i}k{k} type veth peer name {ifname} address {lab_mac(i, k)} "
                          f"netns {st.ns(node)}")
                sw.append(f"link set n{i}k{k} master br{k} up")
                if net.name == STORAGE_NETWORK:
                    sw.append(f"neigh replace {cfg.nodes[i - 1].addresses[net.name]} lladdr {lab_mac(i, k)} "
                              f"dev br{k} nud permanent")
        netns.batch(sw, st.switch)
        for i, node_cfg in enumerate(cfg.nodes, 1):
            lines = ["link set lo up"]
            for k, net in enumerate(cfg.networks, 1):
                addr = node_cfg.addresses[net.name]
                ifname = net.name[:15]
                lines.append(f"addr add {addr}/{net.subnet.prefixlen} dev {ifname}")
                lines.append(f"link set {ifname} up")
                if net.name == STORAGE_NETWORK:
                    # static too: a held link delays the node's ARP replies and probes
                    target = net.subnet.network_address + TARGET_HOST
                    lines.append(f"neigh replace {target} lladdr {lab_mac(TARGET_HOST, k)} "
                                 f"dev {ifname} nud permanent")
                    continue
                # Static, permanent neighbours between nodes: the kernel's ARP table
                # is one table for all namespaces, capped by gc_thresh3 (1024 by
                # default); a 64-node lab needs 64×63×3 entries. Permanent ones are
                # exempt from that cap, and we change no host setting.
                for j, peer in enumerate(cfg.nodes, 1):
                    if j != i:
                        lines.append(f"neigh replace {peer.addresses[net.name]} lladdr {lab_mac(j, k)} "
                                     f"dev {ifname} nud permanent")
            netns.batch(lines, st.ns(node_cfg.name))

    def _make_lun(self, st: LabState) -> None:
        """A fresh sparse LUN, formatted as the lab's shared volume."""
        st.image.unlink(missing_ok=True)  # the lab's own file: a lab always starts from a new LUN
        format_volume(str(st.image), LUN_SIZE, name=VOLUME_NAME)

    def target_command(self, st: LabState, target_ip: str) -> list[str]:
        cmd = [sys.executable, "-m", "shoal", "nbd", "serve", "--file", str(st.image), "--name", LUN_EXPORT,
               "--listen", f"{target_ip}:{NBD_PORT}"]
        return ["ip", "netns", "exec", st.switch, *cmd] if st.mode == "netns" else cmd

    def _start_target(self, st: LabState, target_ip: str) -> None:
        with open(st.target_log, "ab") as log:
            p = subprocess.Popen(self.target_command(st, target_ip), stdout=log, stderr=log,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        st.target_pid = p.pid

    def _wait_target(self, st: LabState, target_ip: str) -> None:
        """Agents start only once the LUN is served, so none begins with a failed path."""
        probe = [sys.executable, "-m", "shoal.lab.probe", target_ip, str(NBD_PORT), LUN_EXPORT,
                 str(TARGET_START_TIMEOUT_S), str(st.target_pid)]
        if st.mode == "netns":
            probe = ["ip", "netns", "exec", st.switch, *probe]
        try:
            res = subprocess.run(probe, capture_output=True, text=True, timeout=TARGET_START_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired as err:
            raise LabError(f"the storage target {st.target} did not come up; see {st.target_log}.") from err
        if res.returncode != 0:
            why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"
            raise LabError(f"the storage target {st.target} did not come up: {why} See {st.target_log}.")

    def agent_command(self, st: LabState, node: str) -> list[str]:
        cmd = [sys.executable, "-m", "shoal.agent", "--config", str(st.config), "--node", node]
        return ["ip", "netns", "exec", st.ns(node), *cmd] if st.mode == "netns" else cmd

    def _start_agent(self, st: LabState, node: str) -> None:
        log = open(self.dir / "logs" / f"{node}.log", "ab")
        p = subprocess.Popen(self.agent_command(st, node), stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        st.agents[node] = p.pid

    def _wait_agents(self, st: LabState, nodes: list[str] | None = None) -> None:
        nodes = nodes or st.nodes
        # agents start in parallel; a big lab on few cores needs longer
        limit_s = AGENT_START_TIMEOUT_S + 0.5 * len(nodes)
        deadline = time.monotonic() + limit_s
        for node in nodes:
            sock = Path(st.dir) / "run" / f"{node}.sock"
            while True:
                if sock.exists():
                    try:
                        request(sock, "status", timeout_s=2)
                        break
                    except AgentError:
                        pass
                if not procs.alive(st.agents.get(node)):
                    raise LabError(f"the agent of {node} exited at start; see {self.dir}/logs/{node}.log.")
                if time.monotonic() > deadline:
                    raise LabError(f"the agent of {node} did not start within {limit_s:g} s; "
                                   f"see {self.dir}/logs/{node}.log.")
                time.sleep(0.05)
            if st.blocked.get(node):
                request(sock, "block", networks=st.blocked[node])

    # -- faults ---------------------------------------------------------------

    def _network_state(self, st: LabState, network: str) -> None:
        if network not in st.networks:
            raise LabError(f"the lab has no network {network!r}; its networks are {', '.join(st.networks)}.")

    def set_link(self, node: str, network: str, up: bool) -> str:
        st = self.load()
        self.node_state(st, node)
        self._network_state(st, network)
        if st.mode == "netns":
            netns.ip("-n", st.ns(node), "link", "set", network[:15], "up" if up else "down")
            return f"{node}: link {network} {'up' if up else 'down'} (interface {network[:15]} in {st.ns(node)})"
        blocked = set(st.blocked.get(node, []))
        if up:
            blocked.discard(network)
        else:
            blocked.add(network)
        st.blocked[node] = sorted(blocked)
        self.save(st)
        if procs.alive(st.agents.get(node)):
            request(Path(st.dir) / "run" / f"{node}.sock", "block", networks=sorted(blocked))
        return f"{node}: link {network} {'up' if up else 'down'} (in-process fault: loopback lab)"

    def hold_link(self, node: str, network: str, hold: bool) -> str:
        """Hold (queue, not drop) or release what ``node`` sends on ``network``."""
        st = self.load()
        self.node_state(st, node)
        self._network_state(st, network)
        if st.mode != "netns":
            raise LabError("holding a link needs the network-namespace lab: this lab runs on loopback "
                           "addresses; run 'shoal lab up' as root without --loopback.")
        held = network in self.held_links(st, node)
        if hold == held:
            return f"{node}: link {network} is {'already' if held else 'not'} held"
        ifb = hold_device(st.networks.index(network) + 1)
        cmd = ["ip", "netns", "exec", st.ns(node), sys.executable, "-m", "shoal.lab.hold",
               "hold" if hold else "release", network[:15], ifb]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=HOLD_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise LabToolError(f"{'holding' if hold else 'releasing'} link {network} of {node} did not finish "
                               f"within {HOLD_TIMEOUT_S:g} s.") from err
        if res.returncode != 0:
            why = res.stderr.strip()[-500:] or f"exit status {res.returncode}"
            raise LabToolError(f"{'holding' if hold else 'releasing'} link {network} of {node} failed: {why}")
        if hold:
            return (f"{node}: link {network} held: what {node} sends on it is queued, not delivered, until "
                    f"'shoal lab release link {node} {network}'")
        return f"{node}: link {network} released: {res.stdout.strip()}"

    def held_links(self, st: LabState, node: str, devices: dict[str, str] | None = None) -> list[str]:
        """Networks whose traffic from ``node`` is held, as the node's namespace shows them
        (its hold devices), not as lab.json remembers."""
        if st.mode != "netns":
            return []
        if devices is None:
            devices = netns.link_states(st.ns(node))
        return [n for k, n in enumerate(st.networks, 1) if hold_device(k) in devices]

    def _node_pids(self, st: LabState, node: str) -> tuple[list[int], list[int]]:
        pgids = [st.agents[node]] if st.agents.get(node) else []
        pids = netns.netns_pids(st.ns(node)) if st.mode == "netns" else []
        return pgids, pids

    def kill(self, node: str) -> str:
        st = self.load()
        self.node_state(st, node)
        pgids, pids = self._node_pids(st, node)
        procs.kill_hard(pgids, pids)
        (Path(st.dir) / "run" / f"{node}.sock").unlink(missing_ok=True)
        return f"{node}: agent and everything it started killed (SIGKILL)"

    def signal_node(self, node: str, sig: int) -> str:
        st = self.load()
        self.node_state(st, node)
        pgids, pids = self._node_pids(st, node)
        if not pgids or not procs.alive(pgids[0]):
            raise LabError(f"the agent of {node} is not running; start it with 'shoal lab start {node}'.")
        for g in pgids:
            procs.signal_group(g, sig)
        procs.signal_pids(pids, sig)
        word = "frozen (SIGSTOP)" if sig == signal.SIGSTOP else "thawed (SIGCONT)"
        return f"{node}: agent {word}"

    def start(self, node: str) -> str:
        st = self.load()
        self.node_state(st, node)
        if procs.alive(st.agents.get(node)):
            raise LabError(f"the agent of {node} is already running (pid {st.agents[node]}).")
        self._start_agent(st, node)
        self.save(st)
        self._wait_agents(st, [node])
        return f"{node}: agent started (pid {st.agents[node]})"

    # -- inspect --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.load()
        nodes = {}
        for node in st.nodes:
            pid = st.agents.get(node)
            pstate = procs.proc_state(pid) if pid else None
            agent = "stopped" if not procs.alive(pid) else "frozen" if pstate == "T" else "running"
            if st.mode == "netns":
                ls = netns.link_states(st.ns(node))
                links = {n: ls.get(n[:15], "missing") for n in st.networks}
                held = self.held_links(st, node, ls)
            else:
                links = {n: "down" if n in st.blocked.get(node, []) else "up" for n in st.networks}
                held = []
            nodes[node] = {"agent": agent, "pid": pid, "links": links, "held": held,
                           "namespace": st.ns(node) if st.mode == "netns" else None}
        target = {"url": st.target, "running": procs.alive(st.target_pid), "pid": st.target_pid,
                  "image": str(st.image), "log": str(st.target_log),
                  "namespace": st.switch if st.mode == "netns" else None}
        return {"name": st.name, "dir": st.dir, "mode": st.mode, "config": str(st.config),
                "storage_target": target, "nodes": nodes}

    def exec_env(self, st: LabState, node: str) -> dict[str, str]:
        return {**os.environ, "SHOAL_CONFIG": str(st.config), "SHOAL_NODE": node, "SHOAL_LAB_DIR": st.dir}

    def exec(self, node: str, cmd: list[str]) -> int:
        st = self.load()
        self.node_state(st, node)
        if not cmd:
            raise LabError("say what to run: shoal lab exec NODE -- COMMAND.")
        full = ["ip", "netns", "exec", st.ns(node), *cmd] if st.mode == "netns" else cmd
        try:
            return subprocess.run(full, env=self.exec_env(st, node)).returncode
        except FileNotFoundError as err:
            raise LabError(f"cannot run {cmd[0]!r}: not found.") from err

    # -- down -----------------------------------------------------------------

    def down(self, name: str | None = None) -> list[str]:
        """Remove everything the lab made. Idempotent; works without lab.json."""
        done: list[str] = []
        st: LabState | None = None
        with contextlib.suppress(LabNotFound, ValueError, TypeError):
            st = self.load()
        names = {n for n in (name, st.name if st else None) if n}
        if not names and not self.dir.exists():
            names.add("lab")
        if not names:
            names.add("lab")
        pgids = [p for p in (st.agents.values() if st else []) if p]
        if st and st.target_pid:
            pgids.append(st.target_pid)
        pids = procs.pids_mentioning_arg(str(self.dir / "cluster.toml"))
        pids += procs.pids_mentioning_arg(str(self.dir / "lun0.img"))
        namespaces = [ns for n in names for ns in netns.list_netns(f"shoal-{n}-")] if is_root() else []
        for ns in namespaces:
            pids += netns.netns_pids(ns)
        pgids = [g for g in pgids if procs.alive(g)]
        if pgids or pids:
            procs.kill_hard(pgids, sorted(set(pids)))
            done.append(f"killed {len(set(pgids) | set(pids))} process(es)")
        for ns in namespaces:
            netns.ip("netns", "del", ns, check=False)
        if namespaces:
            done.append(f"removed {len(namespaces)} namespace(s)")
        for mnt in _mounts_under(self.dir):
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
            done.append(f"unmounted {mnt}")
        removed = _remove_lab_files(self.dir)
        if removed:
            done.append(f"removed {self.dir}")
        return done


def _mounts_under(d: Path) -> list[str]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    prefix = str(d.resolve()) + "/"
    return sorted({ln.split()[1] for ln in lines if (ln.split()[1] + "/").startswith(prefix)}, reverse=True)


_LAB_FILES = ("lab.json", "lab.tmp", "cluster.toml", "cluster.secret", "lun0.img")
_LAB_DIRS = ("logs", "run")


def _remove_lab_files(d: Path) -> bool:
    """Remove only what a lab makes, so a mistaken --dir cannot wipe user data."""
    import shutil

    if not d.is_dir():
        return False
    for name in _LAB_FILES:
        (d / name).unlink(missing_ok=True)
    for tmp in d.glob(".cluster.toml.*.tmp"):
        tmp.unlink(missing_ok=True)
    for sub in _LAB_DIRS:
        shutil.rmtree(d / sub, ignore_errors=True)
    with contextlib.suppress(OSError):
        d.rmdir()
    return not d.exists()
