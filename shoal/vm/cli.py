"""``shoal vm ...`` and ``shoal node drain|resume``: ask this node's agent, which asks the
VM's owner and the coordinator keeping the VM's record."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from shoal.agent.control import request
from shoal.config import locate
from shoal.errors import UsageError
from shoal.util.sizes import format_size, parse_size
from shoal.vm.record import TEST_GUESTS

LONG_TIMEOUT_S = 3600.0


def _agent(args: argparse.Namespace, op: str, timeout_s: float = 120.0, **kw: Any) -> Any:
    cfg, node = locate.resolve(args)
    return request(cfg.control_socket(node), op, timeout_s=timeout_s, **kw)


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _memory_mib(text: str) -> int:
    """``--memory``: MiB when a bare number (like QEMU's -m), else a size (512M, 2G)."""
    if text.isdigit():
        return int(text)
    size = parse_size(text)
    if size % (1 << 20):
        raise UsageError(f"--memory {text} is not a whole number of MiB.")
    return size >> 20


def parse_disk(text: str) -> dict[str, Any]:
    """``vol1:/vms/a.raw[,size=1G]`` -> a DiskSpec dict."""
    target, _, opts = text.partition(",")
    vol, sep, path = target.partition(":")
    if not sep or not vol or not path.startswith("/"):
        raise UsageError(f"--disk {text!r} is not VOLUME:/path[,size=SIZE] (for example vol1:/vms/a.raw,size=1G).")
    size = 0
    for opt in _names(opts):
        key, _, value = opt.partition("=")
        if key != "size" or not value:
            raise UsageError(f"--disk {text!r}: unknown option {opt!r}; the only option is size=SIZE.")
        size = parse_size(value)
    return {"volume": vol, "path": path, "size": size}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vm", help="VMs on shared volumes: create, start, migrate, verify")
    vsub = p.add_subparsers(dest="vm_command", metavar="ACTION")
    vsub.required = True

    def add(name: str, help_: str, handler: Any) -> argparse.ArgumentParser:
        sp = vsub.add_parser(name, help=help_, description=help_)
        locate.add_arguments(sp)
        sp.set_defaults(handler=handler)
        return sp

    c = add("create", "define a VM whose disks are files on shared volumes", cmd_create)
    c.add_argument("name")
    c.add_argument("--memory", required=True, help="guest memory: MiB, or a size such as 512M or 2G")
    c.add_argument("--cpus", type=int, default=1)
    c.add_argument("--disk", action="append", required=True, metavar="VOLUME:/path[,size=SIZE]",
                   help="a disk (repeat for more); size= creates the file when it does not exist. "
                        "The VM's definition is stored on the volume of the first disk.")
    c.add_argument("--test-guest", choices=TEST_GUESTS,
                   help="run a test guest: memory (dirties memory, checkable after migration) or "
                        "disk (Linux writing and verifying its disk)")
    c.add_argument("--dirty-rate", type=int, default=16, metavar="MIB_S",
                   help="memory test guest: how fast it dirties memory, default 16 (0 = as fast as it can)")
    c.add_argument("--kernel", help="boot this kernel (a path that exists on every node)")
    c.add_argument("--initrd", help="initramfs for --kernel")
    c.add_argument("--append", help="kernel command line for --kernel")
    c.add_argument("--cpu-model", default="qemu64", help="QEMU CPU model (default qemu64, migratable anywhere)")
    c.add_argument("--preferred-owners", metavar="n1,n2", help="nodes to run on, in order of preference")
    c.add_argument("--migration-networks", metavar="net1,net2",
                   help="networks live migration may use, in order (default: the second-lowest metric)")
    c.add_argument("--allow-postcopy", action="store_true",
                   help="let the convergence policy switch to post-copy (a network failure then loses the VM)")
    c.add_argument("--start", action="store_true", help="start it at once")
    c.add_argument("--json", action="store_true")

    ls = add("ls", "VMs: state, owner node, uptime, last migration", cmd_ls)
    ls.add_argument("--json", action="store_true")

    st = add("start", "start a VM (on its preferred owner, or --on NODE)", cmd_start)
    st.add_argument("name")
    st.add_argument("--on", metavar="NODE")
    for name, help_ in (("stop", "stop a VM (guest power-off, then QEMU quits)"),
                        ("kill", "end a VM's QEMU at once")):
        sp = add(name, help_, cmd_stop)
        sp.add_argument("name")
        sp.add_argument("--on", metavar="NODE", help="only if it runs on NODE")
        sp.set_defaults(force=name == "kill")

    d = add("delete", "forget a stopped VM (its disk files stay)", cmd_delete)
    d.add_argument("name")

    con = add("console", "the VM's serial console output", cmd_console)
    con.add_argument("name")
    con.add_argument("--follow", "-f", action="store_true", help="keep printing new output (Ctrl-C ends)")

    ver = add("verify", "check a test guest: memory pattern (memory) or disk verification log (disk)", cmd_verify)
    ver.add_argument("name")
    ver.add_argument("--json", action="store_true")

    m = add("migrate", "move a running VM to another node (live, or --quick through a saved state)", cmd_migrate)
    m.add_argument("name")
    m.add_argument("--to", required=True, metavar="NODE")
    m.add_argument("--quick", action="store_true", help="save the state to the volume and restore it on NODE")
    m.add_argument("--network", metavar="NET", help="use this network and no other")
    m.add_argument("--bandwidth", type=int, metavar="MIB_S",
                   help="bandwidth cap for the memory copy (default 1024 MiB/s)")
    m.add_argument("--json", action="store_true")


def register_node(nsub: argparse._SubParsersAction) -> None:
    """``shoal node drain|resume`` (called by ``shoal.agent.cli``)."""
    dr = nsub.add_parser("drain", help="live-migrate every VM off a node, then mark it paused")
    locate.add_arguments(dr)
    dr.add_argument("target", metavar="NODE")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(handler=cmd_drain)
    rs = nsub.add_parser("resume", help="let a paused node take VMs again")
    locate.add_arguments(rs)
    rs.add_argument("target", metavar="NODE")
    rs.set_defaults(handler=cmd_resume)


# ---- handlers -------------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    if args.cpus < 1:
        raise UsageError("--cpus must be 1 or more.")
    spec = {
        "name": args.name, "memory_mib": _memory_mib(args.memory), "cpus": args.cpus,
        "disks": [parse_disk(d) for d in args.disk], "test_guest": args.test_guest,
        "dirty_rate_mib_s": args.dirty_rate, "kernel": args.kernel, "initrd": args.initrd,
        "append": args.append, "cpu_model": args.cpu_model,
        "preferred_owners": _names(args.preferred_owners),
        "migration_networks": _names(args.migration_networks), "allow_postcopy": args.allow_postcopy,
    }
    out = _agent(args, "vm_create", spec=spec, start=args.start)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for d in out["created_disks"]:
        print(f"created disk {d}")
    print(f"VM {args.name} defined (stored on {spec['disks'][0]['volume']})")
    if "start" in out:
        s = out["start"]
        print(f"started on {s['node']} (pid {s['pid']}, {s['accel'].upper()}: {s['accel_reason']})")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cmd_ls(args: argparse.Namespace) -> int:
    out = _agent(args, "vm_ls")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'NAME':<14} {'STATE':<22} {'OWNER':<8} {'UPTIME':>8}  {'MEMORY':>7}  LAST MIGRATION")
    for v in out["vms"]:
        lm = v.get("last_migration") or {}
        last = (f"{lm.get('mode')} {lm.get('from')}→{lm.get('to')} over {lm.get('network') or 'volume'}, "
                f"downtime {lm.get('downtime_ms')} ms, total {lm.get('total_ms')} ms") if lm else "-"
        print(f"{v['name']:<14} {v['state']:<22} {v['owner'] or '-':<8} {_age(v['uptime_s']):>8}  "
              f"{format_size(v['memory_mib'] << 20):>7}  {last}")
    if out["paused_nodes"]:
        print(f"paused nodes: {', '.join(out['paused_nodes'])}")
    if out["volumes_not_answering"]:
        print(f"warning: no coordinator answers for {', '.join(out['volumes_not_answering'])}: "
              "its VMs are not listed")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    s = _agent(args, "vm_start", name=args.name, on=args.on)
    print(f"{args.name} runs on {s['node']} (pid {s['pid']}, {s['accel'].upper()})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    if args.on:
        vms = {v["name"]: v for v in _agent(args, "vm_ls")["vms"]}
        owner = vms.get(args.name, {}).get("owner")
        if owner != args.on:
            raise UsageError(f"{args.name} does not run on {args.on} (owner: {owner or 'none'}); nothing done.")
    s = _agent(args, "vm_stop", name=args.name, force=args.force)
    print(f"{args.name}: {s['how']}" + (f" on {s['node']}" if s.get("node") else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    s = _agent(args, "vm_delete", name=args.name)
    print(f"VM {args.name} deleted; its disks stay: {', '.join(s['disks_kept'])}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    out = _agent(args, "vm_console", name=args.name)
    sys.stdout.write(out["text"])
    sys.stdout.flush()
    while args.follow:
        time.sleep(0.5)
        out = _agent(args, "vm_console", name=args.name, offset=out["offset"])
        sys.stdout.write(out["text"])
        sys.stdout.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    out = _agent(args, "vm_verify", name=args.name)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.name} on {out['node']}: {'OK' if out['ok'] else 'FAILED'}: {out['verdict']}")
    return 0 if out["ok"] else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    out = _agent(args, "vm_migrate", timeout_s=LONG_TIMEOUT_S, name=args.name, to=args.to, quick=args.quick,
                 network=args.network, bandwidth=args.bandwidth)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    how = f"over {out['network']}" if out.get("network") else "through the state file on the volume"
    print(f"{args.name}: {out['from']} → {out['to']} ({out['mode']} migration {how})")
    print(f"  downtime {out['downtime_ms']} ms, total {out['total_ms']} ms, "
          f"{format_size(int(out.get('transferred_bytes') or 0))} transferred in {out.get('iterations')} iterations")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    out = _agent(args, "node_drain", timeout_s=LONG_TIMEOUT_S, node=args.target)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if not out["left"] else 1
    for r in out["results"]:
        if r.get("error"):
            print(f"  {r['vm']}: NOT moved: {r['error']}")
        else:
            print(f"  {r['vm']}: → {r['to']} over {r['network']}, downtime {r['downtime_ms']} ms")
    print(f"{args.target} is paused" + (f"; still running there: {', '.join(out['left'])}" if out["left"] else
                                       "; no VM runs there"))
    return 0 if not out["left"] else 1


def cmd_resume(args: argparse.Namespace) -> int:
    _agent(args, "node_resume", node=args.target)
    print(f"{args.target} takes VMs again")
    return 0
