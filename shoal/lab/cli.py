"""``shoal lab …``: a cluster of N hosts on this machine, and faults to inject."""

from __future__ import annotations

import argparse
import json
import signal

from shoal.config.timing import PROFILES
from shoal.lab.lab import Lab, default_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a cluster on this machine: namespaces, storage target, faults")
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    lsub.required = True

    def add(name: str, help: str, handler: object) -> argparse.ArgumentParser:
        sp = lsub.add_parser(name, help=help)
        sp.add_argument("--dir", help=f"lab directory (default $SHOAL_LAB_DIR or {default_dir()})")
        sp.set_defaults(handler=handler)
        return sp

    up = add("up", "build the lab and start an agent on every node", cmd_up)
    up.add_argument("--nodes", type=int, default=3, help="number of hosts (default 3)")
    up.add_argument("--name", default="lab", help="lab name, prefix of its namespaces (default lab)")
    up.add_argument("--loopback", action="store_true", help="loopback addresses even as root")
    up.add_argument("--timing", choices=sorted(PROFILES), default="default", help="timing profile")

    st = add("status", "what runs, link states, the storage target", cmd_status)
    st.add_argument("--json", action="store_true", help="machine-readable output")

    ex = add("exec", "run a command as a node (in its namespace, SHOAL_NODE set)", cmd_exec)
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")

    for verb, up_ in (("fail", False), ("restore", True)):
        f = add(verb, f"{'take a link down' if not up_ else 'bring a link back up'}", cmd_link)
        f.add_argument("what", choices=["link"])
        f.add_argument("node")
        f.add_argument("network")
        f.set_defaults(link_up=up_)

    for verb, hold in (("hold", True), ("release", False)):
        h = add(verb, "queue what a node sends on a link, deliver it only on release" if hold
                else "deliver what a held link queued, late, and stop holding", cmd_hold)
        h.add_argument("what", choices=["link"])
        h.add_argument("node")
        h.add_argument("network")
        h.set_defaults(hold=hold)

    k = add("kill", "SIGKILL a node's agent and everything it started", cmd_kill)
    k.add_argument("node")
    s = add("start", "start a node's agent again (after kill)", cmd_start)
    s.add_argument("node")
    fr = add("freeze", "SIGSTOP a node's agent and everything it started", cmd_signal)
    fr.add_argument("node")
    fr.set_defaults(sig=signal.SIGSTOP)
    th = add("thaw", "SIGCONT a frozen node", cmd_signal)
    th.add_argument("node")
    th.set_defaults(sig=signal.SIGCONT)

    dn = add("down", "remove every namespace, process and file of the lab (idempotent)", cmd_down)
    dn.add_argument("--name", help="also remove leftovers of the lab with this name (default: the lab's, or lab)")


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    st = lab.up(args.nodes, name=args.name, loopback=True if args.loopback else None, timing=args.timing)
    print(f"lab {st.name} up in {st.dir} ({st.mode}): {len(st.nodes)} nodes, networks "
          f"{', '.join(st.networks)}; storage target {st.target}")
    print(f"try: shoal lab exec {st.nodes[0]} -- shoal network ls")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = Lab(args.dir).status()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    t = s["storage_target"]
    print(f"lab {s['name']} in {s['dir']} ({s['mode']})")
    print(f"  storage target {t['url']} {'running' if t['running'] else 'NOT running'} "
          f"(pid {t['pid'] or '-'}, {t['image']}; log {t['log']})")
    for node, info in s["nodes"].items():
        links = " ".join(f"{n}:{v}" for n, v in info["links"].items())
        held = f"  held: {', '.join(info['held'])}" if info["held"] else ""
        print(f"  {node:<8} agent {info['agent']:<8} pid {info['pid'] or '-':<8} {links}{held}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return Lab(args.dir).exec(args.node, cmd)


def cmd_link(args: argparse.Namespace) -> int:
    print(Lab(args.dir).set_link(args.node, args.network, args.link_up))
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    print(Lab(args.dir).hold_link(args.node, args.network, args.hold))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    print(Lab(args.dir).kill(args.node))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    print(Lab(args.dir).start(args.node))
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    print(Lab(args.dir).signal_node(args.node, args.sig))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    done = lab.down(args.name)
    print(f"lab in {lab.dir}: " + ("; ".join(done) if done else "nothing to remove"))
    return 0
