"""``shoal cluster init`` and ``shoal cluster check``."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from shoal.config.errors import ConfigError
from shoal.config.model import ClusterConfig, Network, Node, Role, load_config, write_config
from shoal.config.timing import PROFILES

DEFAULT_NETWORKS = (
    ("cluster", Role.CLUSTER),
    ("public", Role.CLUSTER_AND_CLIENT),
    ("migration", Role.CLUSTER),
    ("storage", Role.NONE),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="create and check the cluster configuration")
    csub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    csub.required = True

    init = csub.add_parser("init", help="write a starting configuration and a cluster secret")
    init.add_argument("config", nargs="?", default="cluster.toml", help="file to write (default cluster.toml)")
    init.add_argument("--name", default="shoal", help="cluster name")
    init.add_argument("--nodes", type=int, default=3, help="number of nodes to declare (default 3)")
    init.add_argument("--base", default="198.18.0.0", help="network k gets <base>+k.0/24 (default 198.18.0.0)")
    init.add_argument("--run-dir", default="/run/shoal", help="directory of the control sockets")
    init.add_argument("--timing", choices=sorted(PROFILES), default="default", help="timing profile")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=cmd_init)

    check = csub.add_parser("check", help="validate a configuration file")
    check.add_argument("config", help="file to check")
    check.set_defaults(handler=cmd_check)


def make_config(
    name: str,
    nodes: int,
    *,
    base: str = "198.18.0.0",
    networks: tuple[tuple[str, Role], ...] = DEFAULT_NETWORKS,
    run_dir: str = "/run/shoal",
    timing: str = "default",
    secret_file: str = "cluster.secret",
    heartbeat_port: int = 3343,
    rpc_port: int = 3344,
) -> ClusterConfig:
    """A cluster whose network k (1-based) is <base>+k.0/24 and node i has host part i."""
    start = ipaddress.ip_address(base)
    nets = []
    for k, (net_name, role) in enumerate(networks, 1):
        nets.append(Network(net_name, ipaddress.ip_network(f"{start + k * 256}/24"), role))
    node_list = []
    for i in range(1, nodes + 1):
        addrs = {n.name: str(n.subnet.network_address + i) for n in nets}
        node_list.append(Node(f"node{i}", i, addrs))
    return ClusterConfig(
        name=name,
        secret_file=Path(secret_file),
        run_dir=Path(run_dir),
        networks=tuple(nets),
        nodes=tuple(node_list),
        timing=PROFILES[timing],
        timing_profile=timing,
        heartbeat_port=heartbeat_port,
        rpc_port=rpc_port,
    )


def write_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it.")
    if not 1 <= args.nodes <= 250:
        raise ConfigError("--nodes must be between 1 and 250.")
    try:
        cfg = make_config(args.name, args.nodes, base=args.base, run_dir=args.run_dir, timing=args.timing)
    except ValueError as err:
        raise ConfigError(f"--base {args.base!r} is not a usable IPv4 address: {err}.") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = path.parent / "cluster.secret"
    if not secret.exists() or args.force:
        write_secret(secret)
    write_config(cfg, path)
    load_config(path)  # what we wrote must load
    print(f"wrote {path} (cluster {args.name}, {args.nodes} nodes) and the cluster secret {secret}")
    print("copy both to every node; edit the addresses to match your networks")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    t = cfg.timing
    print(
        f"{args.config}: cluster {cfg.name}, {len(cfg.nodes)} nodes, {len(cfg.networks)} networks, "
        f"{len(cfg.volumes)} volume{'' if len(cfg.volumes) == 1 else 's'}, timing {cfg.timing_profile} "
        f"({t.heartbeat_interval_s:g} s × {t.heartbeat_threshold}, I/O timeout {t.io_timeout_s:g} s): valid"
    )
    return 0
