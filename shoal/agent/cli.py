"""``shoal node run`` (the agent, in the foreground) and ``shoal node ls``."""

from __future__ import annotations

import argparse
import json
import logging

from shoal.agent.control import request
from shoal.config import locate
from shoal.util import loop


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run the node agent, list nodes")
    nsub = p.add_subparsers(dest="node_command", metavar="ACTION")
    nsub.required = True

    run = nsub.add_parser("run", help="run this node's agent in the foreground")
    locate.add_arguments(run)
    run.set_defaults(handler=cmd_run)

    ls = nsub.add_parser("ls", help="nodes with their state and per-network heartbeats")
    locate.add_arguments(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=cmd_ls)

    from shoal.vm.cli import register_node

    register_node(nsub)


def run_agent(config: str, node: str) -> int:
    from shoal.agent.agent import NodeAgent

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    agent = NodeAgent(config, node)
    loop.run(agent.run())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg, node = locate.resolve(args)
    assert cfg.path is not None
    return run_agent(str(cfg.path), node)


def _age(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f}s"


def cmd_ls(args: argparse.Namespace) -> int:
    cfg, node = locate.resolve(args)
    view = request(cfg.control_socket(node), "status")
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    nets = list(view["metrics"])
    print(f"cluster {view['cluster']}, as seen from {view['node']}")
    header = f"{'NODE':<12} {'STATE':<9}" + "".join(f" {n:<20}" for n in nets)
    print(header)
    for name, info in view["nodes"].items():
        cells = []
        for n in nets:
            if name == view["node"]:
                cells.append("(self)")
            else:
                link = info["links"].get(n, {"state": "-", "last_seen_s": None})
                cells.append(f"{link['state']} {_age(link['last_seen_s'])}")
        state = info["state"] + (",paused" if info.get("paused") else "")
        print(f"{name:<12} {state:<9}" + "".join(f" {c:<20}" for c in cells))
    for peer, err in view.get("auth_failures", {}).items():
        print(f"warning: {peer}: {err}")
    return 0
