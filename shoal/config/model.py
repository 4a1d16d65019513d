"""The cluster configuration file (TOML) and its validation.

Layout::

    [cluster]
    name = "demo"
    secret_file = "cluster.secret"   # relative to this file; 32+ random bytes, mode 0600
    run_dir = "/run/shoal"           # control sockets: <run_dir>/<node>.sock
    heartbeat_port = 3343            # UDP, on every cluster-enabled network
    rpc_port = 3344                  # TCP, authenticated agent-to-agent channel
    generation = 1                   # bumped by every cluster-wide change

    [timing]                         # see shoal.config.timing
    profile = "default"              # default | relaxed | fast
    io_timeout_s = 1.0               # any timing key overrides the profile's value

    [[network]]                      # declaration order matters for auto metrics
    name = "cluster"
    subnet = "198.18.1.0/24"
    role = "cluster"                 # none | cluster | cluster-and-client
    metric = "auto"                  # or a whole number pinned by hand

    [[node]]
    name = "node1"
    id = 1
    addresses = { cluster = "198.18.1.1" }

    [[volume]]                       # see shoal.config.volumes
    name = "vol1"                    # 1-64 of A-Z a-z 0-9 - _, unique
    lun = "nbd://198.18.4.250:10809/lun0"   # or an absolute path: /dev/sdb
    paths = { node1 = "/dev/mapper/lun0" }  # optional: a node's own path to the LUN

    [vm_defaults]                    # passed through for the VM code
    memory_mib = 512

Every key is described in docs/CONFIG.md. Validation collects every problem as
one sentence and raises ``ConfigInvalid`` with all of them, so a user fixes the
file in one pass.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.config.errors import ConfigError, ConfigInvalid, ConfigNotFound
from shoal.config.timing import PROFILES, Timing, timing_from_table
from shoal.config.volumes import VolumeConfig, parse_volumes


class Role(enum.StrEnum):
    """Stable names: they appear in the file, the CLI and JSON."""

    NONE = "none"
    CLUSTER = "cluster"
    CLUSTER_AND_CLIENT = "cluster-and-client"

    @property
    def carries_cluster_traffic(self) -> bool:
        return self is not Role.NONE


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    role: Role
    metric: int | None = None  # None: automatic

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subnet": str(self.subnet),
            "role": self.role.value,
            "metric": "auto" if self.metric is None else self.metric,
        }


@dataclass(frozen=True)
class Node:
    name: str
    id: int
    addresses: dict[str, str]  # network name -> address


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    secret_file: Path
    run_dir: Path
    networks: tuple[Network, ...]
    nodes: tuple[Node, ...]
    timing: Timing = field(default_factory=Timing)
    timing_profile: str = "default"
    timing_overrides: dict[str, Any] = field(default_factory=dict)
    heartbeat_port: int = 3343
    rpc_port: int = 3344
    generation: int = 1
    volumes: tuple[VolumeConfig, ...] = ()
    vm_defaults: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"node {name!r} is not in cluster {self.name!r}; its nodes are "
            f"{', '.join(n.name for n in self.nodes)}."
        )

    def network(self, name: str) -> Network:
        for n in self.networks:
            if n.name == name:
                return n
        raise ConfigError(
            f"network {name!r} is not in cluster {self.name!r}; its networks are "
            f"{', '.join(n.name for n in self.networks)}."
        )

    def volume(self, name: str) -> VolumeConfig:
        for v in self.volumes:
            if v.name == name:
                return v
        if not self.volumes:
            raise ConfigError(
                f"volume {name!r} is not in cluster {self.name!r}, which declares no volumes; "
                "add a [[volume]] table with its name and lun to the configuration."
            )
        raise ConfigError(
            f"volume {name!r} is not in cluster {self.name!r}; its volumes are "
            f"{', '.join(v.name for v in self.volumes)}."
        )

    def control_socket(self, node: str) -> Path:
        return self.run_dir / f"{node}.sock"

    def read_secret(self) -> bytes:
        try:
            secret = self.secret_file.read_bytes().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the cluster secret {self.secret_file}: {err.strerror}; "
                "copy it from another node or create one with 'shoal cluster init'."
            ) from err
        if len(secret) < 32:
            raise ConfigError(
                f"the cluster secret {self.secret_file} is {len(secret)} bytes; it needs at least 32."
            )
        return secret

    def with_networks(self, networks: tuple[Network, ...], generation: int) -> ClusterConfig:
        new = replace(self, networks=networks, generation=generation)
        problems = _check_networks(new.networks, new.nodes)
        if problems:
            raise ConfigInvalid("the change", problems)
        return new


_TOP_KEYS = {"cluster", "timing", "network", "node", "volume", "vm_defaults"}
_CLUSTER_KEYS = {"name", "secret_file", "run_dir", "heartbeat_port", "rpc_port", "generation"}


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as err:
        raise ConfigNotFound(
            f"no cluster configuration at {p}; create one with 'shoal cluster init' or pass --config."
        ) from err
    except OSError as err:
        raise ConfigNotFound(f"cannot read {p}: {err.strerror}.") from err
    return parse_config(text, source=str(p), base=p.parent.resolve(), path=p.resolve())


def parse_config(
    text: str, *, source: str = "config", base: Path | None = None, path: Path | None = None
) -> ClusterConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigInvalid(source, [f"is not valid TOML ({err})."]) from err
    base = base or Path.cwd()
    problems: list[str] = []
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(
                f"unknown section [{key}]; known sections are {', '.join(sorted(_TOP_KEYS))}."
            )

    cl = _table(doc, "cluster", problems)
    for key in cl:
        if key not in _CLUSTER_KEYS:
            problems.append(f"[cluster] has an unknown key {key!r}.")
    name = cl.get("name")
    if not isinstance(name, str) or not name or not name.isprintable():
        problems.append("[cluster] needs a name of printable characters, e.g. name = \"demo\".")
        name = "?"
    for key in ("secret_file", "run_dir"):
        if key in cl and (not isinstance(cl[key], str) or not cl[key] or not cl[key].isprintable()):
            problems.append(f"[cluster] {key} must be a path in quotes, not {cl[key]!r}.")
    secret_file = base / str(cl.get("secret_file", "cluster.secret"))
    run_dir = base / str(cl.get("run_dir", "/run/shoal"))
    ports = {}
    for key, default in (("heartbeat_port", 3343), ("rpc_port", 3344)):
        v = cl.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            problems.append(f"[cluster] {key} must be a port number between 1 and 65535, not {v!r}.")
            v = default
        ports[key] = v
    if ports["heartbeat_port"] == ports["rpc_port"]:
        problems.append("[cluster] heartbeat_port and rpc_port must differ.")
    generation = cl.get("generation", 1)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        problems.append(f"[cluster] generation must be a positive whole number, not {generation!r}.")
        generation = 1

    timing_table = _table(doc, "timing", problems)
    timing, profile, tproblems = timing_from_table(timing_table)
    problems.extend(tproblems)
    overrides = {k: v for k, v in timing_table.items() if k != "profile"}

    networks = _parse_networks(doc.get("network", []), problems)
    nodes = _parse_nodes(doc.get("node", []), problems)
    problems.extend(_check_networks(networks, nodes))

    volumes = parse_volumes(doc.get("volume", []), {n.name for n in nodes}, problems)
    vm_defaults = _table(doc, "vm_defaults", problems)

    if problems:
        raise ConfigInvalid(source, problems)
    return ClusterConfig(
        name=name,
        secret_file=secret_file,
        run_dir=run_dir,
        networks=networks,
        nodes=nodes,
        timing=timing,
        timing_profile=profile,
        timing_overrides=overrides,
        heartbeat_port=ports["heartbeat_port"],
        rpc_port=ports["rpc_port"],
        generation=generation,
        volumes=volumes,
        vm_defaults=vm_defaults,
        path=path,
    )


def _table(doc: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        problems.append(f"[{key}] must be a table.")
        return {}
    return v


def _parse_networks(raw: Any, problems: list[str]) -> tuple[Network, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append("the configuration declares no [[network]]; a cluster needs at least one.")
        return ()
    out: list[Network] = []
    for i, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            problems.append(f"[[network]] number {i} is not a table.")
            continue
        for key in item:
            if key not in ("name", "subnet", "role", "metric"):
                problems.append(f"network number {i} has an unknown key {key!r}.")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"network number {i} has no name.")
            continue
        try:
            subnet = ipaddress.ip_network(str(item.get("subnet", "")), strict=True)
        except ValueError:
            problems.append(
                f"network {name!r} has subnet {item.get('subnet')!r}, which is not a subnet like 198.18.1.0/24."
            )
            continue
        try:
            role = Role(item.get("role", "cluster"))
        except ValueError:
            problems.append(
                f"network {name!r} has role {item.get('role')!r}; use none, cluster or cluster-and-client."
            )
            continue
        metric = item.get("metric", "auto")
        if metric == "auto":
            metric = None
        elif isinstance(metric, bool) or not isinstance(metric, int) or metric < 1:
            problems.append(f"network {name!r} has metric {metric!r}; use \"auto\" or a positive whole number.")
            metric = None
        out.append(Network(name, subnet, role, metric))
    return tuple(out)


def _parse_nodes(raw: Any, problems: list[str]) -> tuple[Node, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append("the configuration declares no [[node]]; a cluster needs at least one.")
        return ()
    out: list[Node] = []
    for i, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            problems.append(f"[[node]] number {i} is not a table.")
            continue
        for key in item:
            if key not in ("name", "id", "addresses"):
                problems.append(f"node number {i} has an unknown key {key!r}.")
        name = item.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"node number {i} has no usable name.")
            continue
        node_id = item.get("id")
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 1 <= node_id <= 65535:
            problems.append(f"node {name!r} needs an id between 1 and 65535, not {node_id!r}.")
            continue
        addrs = item.get("addresses", {})
        if not isinstance(addrs, dict):
            problems.append(f"node {name!r}: addresses must be a table of network = address.")
            continue
        out.append(Node(name, node_id, {str(k): str(v) for k, v in addrs.items()}))
    return tuple(out)


def _check_networks(networks: tuple[Network, ...], nodes: tuple[Node, ...]) -> list[str]:
    problems: list[str] = []
    names = [n.name for n in networks]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"network {dup!r} is declared more than once.")
    for i, a in enumerate(networks):
        for b in networks[i + 1 :]:
            if a.subnet.version == b.subnet.version and a.subnet.overlaps(b.subnet):
                problems.append(
                    f"networks {a.name!r} ({a.subnet}) and {b.name!r} ({b.subnet}) overlap; "
                    "each network needs its own subnet."
                )
    pinned: dict[int, str] = {}
    for n in networks:
        if n.metric is not None and n.role.carries_cluster_traffic:
            if n.metric in pinned:
                problems.append(
                    f"networks {pinned[n.metric]!r} and {n.name!r} both have metric {n.metric}; "
                    "pinned metrics must differ so the route is unambiguous."
                )
            pinned[n.metric] = n.name
    node_names = [n.name for n in nodes]
    for dup in sorted({n for n in node_names if node_names.count(n) > 1}):
        problems.append(f"node {dup!r} is declared more than once.")
    ids = [n.id for n in nodes]
    for dup_id in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"node id {dup_id} is used by more than one node.")
    by_name = {n.name: n for n in networks}
    seen_addr: dict[str, str] = {}
    for node in nodes:
        for net_name, addr in node.addresses.items():
            net = by_name.get(net_name)
            if net is None:
                problems.append(
                    f"node {node.name!r} has an address on network {net_name!r}, which is not declared."
                )
                continue
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                problems.append(f"node {node.name!r} has {addr!r} on {net_name!r}, which is not an IP address.")
                continue
            if ip not in net.subnet:
                problems.append(
                    f"node {node.name!r} has address {addr} on network {net_name!r}, outside its subnet {net.subnet}."
                )
            if addr in seen_addr:
                problems.append(f"address {addr} is given to both {seen_addr[addr]!r} and {node.name!r}.")
            seen_addr[addr] = node.name
        for net in networks:
            if net.role.carries_cluster_traffic and net.name not in node.addresses:
                problems.append(
                    f"node {node.name!r} has no address on cluster network {net.name!r}; "
                    "give it one or set that network's role to none."
                )
    if networks and not any(n.role.carries_cluster_traffic for n in networks):
        problems.append("no network carries cluster traffic; give at least one the role cluster or cluster-and-client.")
    return problems


# -- writing ---------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("-", "").replace("_", "").isalnum() else _toml_value(k)


def dump_config(cfg: ClusterConfig) -> str:
    base = cfg.path.parent if cfg.path else None

    def rel(p: Path) -> str:
        if base is not None and p.parent == base:
            return p.name
        return str(p)

    lines = [
        "# shoal cluster configuration; see 'shoal cluster --help'.",
        "# 'shoal network set' rewrites this file (comments are not kept).",
        "",
        "[cluster]",
        f"name = {_toml_value(cfg.name)}",
        f"secret_file = {_toml_value(rel(cfg.secret_file))}",
        f"run_dir = {_toml_value(str(cfg.run_dir))}",
        f"heartbeat_port = {cfg.heartbeat_port}",
        f"rpc_port = {cfg.rpc_port}",
        f"generation = {cfg.generation}",
        "",
        "[timing]",
        f"profile = {_toml_value(cfg.timing_profile)}",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.timing_overrides.items()]
    for net in cfg.networks:
        lines += ["", "[[network]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in net.to_dict().items()]
    for node in cfg.nodes:
        lines += [
            "",
            "[[node]]",
            f"name = {_toml_value(node.name)}",
            f"id = {node.id}",
            f"addresses = {_toml_value(node.addresses)}",
        ]
    for vol in cfg.volumes:
        lines += ["", "[[volume]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in vol.to_dict().items()]
    if cfg.vm_defaults:
        lines += ["", "[vm_defaults]"]
        lines += [f"{_key(k)} = {_toml_value(v)}" for k, v in cfg.vm_defaults.items()]
    return "\n".join(lines) + "\n"


def write_config(cfg: ClusterConfig, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    p = Path(path)
    text = dump_config(replace(cfg, path=p.resolve()))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def default_timing() -> Timing:
    return PROFILES["default"]
