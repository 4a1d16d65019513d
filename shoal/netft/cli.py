"""``shoal network ls`` and ``shoal network set``."""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from typing import Any

from shoal.agent.control import request
from shoal.config import locate
from shoal.config.model import Role
from shoal.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("network", help="cluster networks: roles, metrics, routes")
    nsub = p.add_subparsers(dest="network_command", metavar="ACTION")
    nsub.required = True

    ls = nsub.add_parser("ls", help="networks with metrics, link states and routes")
    locate.add_arguments(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=cmd_ls)

    st = nsub.add_parser("set", help="change a network's role or metric, cluster-wide")
    locate.add_arguments(st)
    st.add_argument("name", help="network name")
    st.add_argument("--role", choices=[r.value for r in Role])
    st.add_argument("--metric", help="a whole number, or 'auto'")
    st.set_defaults(handler=cmd_set)


def network_table(cluster_view: dict[str, Any]) -> dict[str, Any]:
    """Networks with link state per node and routes per node pair, from gathered views."""
    views: dict[str, Any] = cluster_view["views"]
    local = next(iter(views.values()))
    me = local["node"]
    nodes = list(local["nodes"])
    metrics = local["metrics"]
    networks = []
    for net in cluster_view["networks"]:
        name = net["name"]
        m = metrics.get(name)
        links: dict[str, str] = {}
        if m is not None:
            for node in nodes:
                if node in views:  # the node's own view: up if any of its links there is up
                    own = views[node]["nodes"]
                    ups = [own[p]["links"].get(name, {}).get("state") for p in own if p != node]
                    links[node] = "up" if "up" in ups or not ups else "down"
                else:  # unreachable: what we see of it
                    links[node] = local["nodes"][node]["links"].get(name, {}).get("state", "down")
        networks.append({
            "name": name, "subnet": net["subnet"], "role": net["role"],
            "metric": None if m is None else m["value"],
            "metric_mode": None if m is None else ("auto" if m["auto"] else "pinned"),
            "links": links,
        })
    pairs = []
    for a, b in combinations(nodes, 2):
        src = a if a in views else b if b in views else None
        if src is None:
            continue
        other = b if src == a else a
        r = views[src]["routes"].get(other, {"internal": None, "migration": None})
        pairs.append({"nodes": [a, b], "internal": r["internal"], "migration": r["migration"],
                      "seen_by": src})
    return {"seen_from": me, "generation": local["generation"], "networks": networks, "routes": pairs}


def cmd_ls(args: argparse.Namespace) -> int:
    cfg, node = locate.resolve(args)
    table = network_table(request(cfg.control_socket(node), "cluster_view"))
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'NETWORK':<12} {'SUBNET':<18} {'ROLE':<19} {'METRIC':<14} LINKS")
    for n in table["networks"]:
        metric = "-" if n["metric"] is None else f"{n['metric']} ({n['metric_mode']})"
        links = " ".join(f"{k}:{v}" for k, v in n["links"].items()) or "-"
        print(f"{n['name']:<12} {n['subnet']:<18} {n['role']:<19} {metric:<14} {links}")
    routes = table["routes"]
    for kind, label in (("internal", "internal traffic"), ("migration", "live migration")):
        values = {r[kind] for r in routes}
        if len(values) <= 1:
            print(f"{label}: {next(iter(values), None) or 'no route'}")
        else:
            print(f"{label}:")
            for r in routes:
                print(f"  {r['nodes'][0]} <-> {r['nodes'][1]}: {r[kind] or 'no route'}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    if args.role is None and args.metric is None:
        raise UsageError("say what to change: --role and/or --metric.")
    metric: int | str | None = None
    if args.metric is not None:
        if args.metric == "auto":
            metric = "auto"
        else:
            try:
                metric = int(args.metric)
            except ValueError as err:
                raise UsageError(f"--metric {args.metric!r}: use a whole number or 'auto'.") from err
            if metric < 1:
                raise UsageError("--metric must be positive.")
    cfg, node = locate.resolve(args)
    res = request(cfg.control_socket(node), "network_set", name=args.name, role=args.role, metric=metric)
    n = res["network"]
    print(f"network {n['name']}: role {n['role']}, metric {n['metric']} (generation {res['generation']})")
    if res["missed"]:
        print(f"not reached now (they catch up when they come back): {', '.join(res['missed'])}")
    return 0
