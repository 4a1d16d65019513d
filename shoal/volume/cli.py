"""``shoal volume …`` and ``shoal file …``: the offline commands on a volume image or device.

Offline means no cluster is using the volume: every command but ``info`` refuses when
the coordinator lease is held by a live owner (``in use by cluster C, coordinator N``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from shoal.util.progress import Progress
from shoal.util.sizes import format_size, parse_size
from shoal.volume import defrag as defrag_mod
from shoal.volume import fsck as fsck_mod
from shoal.volume import transfer
from shoal.volume.device import Device
from shoal.volume.errors import VolumeCorrupt, VolumeError
from shoal.volume.format import format_volume
from shoal.volume.layout import BLOCK, LEASE_SECTORS, Superblock
from shoal.volume.lease import FREE, LeaseArea
from shoal.volume.volume import Stat, Volume, load_metadata, read_superblock


def register(sub: Any) -> None:
    _register_volume(sub)
    _register_file(sub)


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _warn(vol: Volume) -> None:
    for w in vol.warnings:
        print(f"shoal: warning: {w}", file=sys.stderr)


# ---- shoal volume ----------------------------------------------------------------------

def _register_volume(sub: Any) -> None:
    p = sub.add_parser("volume", help="format, inspect, check and defragment shared volumes")
    vs = p.add_subparsers(dest="volume_command", metavar="ACTION", required=True)

    f = vs.add_parser("format", help="format a file or block device as a shared volume")
    f.add_argument("path", help="image file (created sparse if missing) or block device")
    f.add_argument("--size", help="volume size, e.g. 10G (required for a new file)")
    f.add_argument("--name", default="", help="volume name (up to 64 bytes)")
    f.add_argument("--unit", default="1M", help="allocation unit, a power of two from 64K to 64M (default 1M)")
    f.add_argument("--force", action="store_true", help="format even if the target holds data")
    f.set_defaults(handler=cmd_format)

    i = vs.add_parser("info", help="name, UUID, geometry, usage and lease state")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(handler=cmd_info)

    c = vs.add_parser("fsck", help="check a volume; exit 0 clean, 1 problems found, 2 could not check")
    c.add_argument("path")
    c.add_argument("--repair", action="store_true", help="fix what is found")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=cmd_fsck)

    d = vs.add_parser("defrag", help="make every file contiguous")
    d.add_argument("path")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=cmd_defrag)

    # online: through this node's agent
    from shoal.config import locate

    o = vs.add_parser("ls", help="the cluster's volumes: coordinator, epoch, each node's state and I/O counters")
    o.add_argument("--json", action="store_true")
    locate.add_arguments(o)
    o.set_defaults(handler=_online("cmd_volume_ls"))
    o = vs.add_parser("move", help="move a volume's coordinator role to another node")
    o.add_argument("volume")
    o.add_argument("--to", required=True, metavar="NODE")
    o.add_argument("--json", action="store_true")
    locate.add_arguments(o)
    o.set_defaults(handler=_online("cmd_volume_move"))
    o = vs.add_parser("maintenance", help="maintenance mode: every other node redirected, the coordinator "
                      "has the LUN to itself")
    o.add_argument("volume")
    o.add_argument("mode", choices=["on", "off"])
    locate.add_arguments(o)
    o.set_defaults(handler=_online("cmd_volume_maintenance"))
    o = vs.add_parser("repair", help="fsck or defrag a volume in use (sets and clears maintenance mode)")
    o.add_argument("volume")
    how = o.add_mutually_exclusive_group(required=True)
    how.add_argument("--fsck", action="store_true", help="check and repair")
    how.add_argument("--defrag", action="store_true", help="make every file contiguous")
    o.add_argument("--json", action="store_true")
    locate.add_arguments(o)
    o.set_defaults(handler=_online("cmd_volume_repair"))


def _online(name: str) -> Any:
    """A handler in shoal.cli.online, imported when used (it talks to the agent)."""
    def run(args: argparse.Namespace) -> int:
        from shoal.cli import online

        return int(getattr(online, name)(args))

    return run


def cmd_format(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size") if args.size else None
    unit = parse_size(args.unit, "--unit")
    sb = format_volume(args.path, size, unit_size=unit, name=args.name, force=args.force)
    print(f"formatted {args.path}: volume {sb.name or '(unnamed)'} {sb.uuid_str}, "
          f"{format_size(sb.volume_size)}, {sb.unit_count} units of {format_size(sb.unit_size)}")
    return 0


def lease_state(area: LeaseArea) -> dict[str, object]:
    lease = area.read_lease()
    if lease.owner == FREE:
        return {"state": "free", "epoch": lease.epoch}
    return {"state": "held", "owner": lease.owner_name(), "owner_id": lease.owner,
            "cluster": lease.cluster, "epoch": lease.epoch, "io_timeout_ms": lease.io_timeout_ms}


def _damage_survey(device: Device, sb: Superblock, area: LeaseArea) -> list[str]:
    """Damage ``info`` can see cheaply: the backup superblock and the lease sectors."""
    found = []
    try:
        Superblock.decode(device.pread(sb.backup_offset, BLOCK), "backup superblock")
    except VolumeError as err:
        found.append(f"{err} (run: shoal volume fsck --repair)")
    for n in range(1, LEASE_SECTORS):
        try:
            area.read_slot(n)
        except VolumeCorrupt as err:
            found.append(f"{err} (run: shoal volume fsck --repair)")
    return found


def cmd_info(args: argparse.Namespace) -> int:
    # info never takes the lease and never waits: it is how you see who holds it
    with Device(args.path, writable=False) as device:
        sb, warnings = read_superblock(device)
        meta, _, _, more = load_metadata(device, sb, strict=False)
        area = LeaseArea(device, sb)
        more.extend(_damage_survey(device, sb, area))
        try:
            lease = lease_state(area)
        except VolumeCorrupt as err:
            lease = {"state": "damaged", "error": str(err)}
    for w in warnings + more:
        print(f"shoal: warning: {w}", file=sys.stderr)
    files = sum(1 for n in meta.inodes.values() if not n.is_dir)
    info = {
        "path": args.path, "name": sb.name, "uuid": sb.uuid_str, "size": sb.volume_size,
        "unit_size": sb.unit_size, "units": sb.unit_count, "used_units": meta.used_units,
        "free_units": sb.unit_count - meta.used_units, "used_bytes": meta.used_units * sb.unit_size,
        "free_bytes": (sb.unit_count - meta.used_units) * sb.unit_size, "files": files,
        "directories": len(meta.inodes) - files, "data_offset": sb.data_offset,
        "journal_size": sb.journal_size, "lease": lease,
    }
    if args.json:
        _print_json(info)
        return 0
    if lease["state"] == "free":
        held = "free"
    elif lease["state"] == "damaged":
        held = f"unknown: {lease['error']}"
    else:
        held = f"held by {lease['owner']} of cluster {lease['cluster'] or '(unnamed)'}, epoch {lease['epoch']}"
    print(f"volume      {sb.name or '(unnamed)'}  {sb.uuid_str}")
    print(f"size        {format_size(sb.volume_size)}  ({sb.volume_size} bytes)")
    print(f"units       {sb.unit_count} x {format_size(sb.unit_size)}: {meta.used_units} used, "
          f"{sb.unit_count - meta.used_units} free ({format_size((sb.unit_count - meta.used_units) * sb.unit_size)})")
    print(f"files       {files} files, {len(meta.inodes) - files} directories")
    print(f"layout      journal {format_size(sb.journal_size)}, data from byte {sb.data_offset}")
    print(f"lease       {held}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    report = fsck_mod.fsck(args.path, repair=args.repair)
    if args.json:
        _print_json(report.to_json())
        return report.exit_code
    if report.error:
        print(f"shoal: {report.error}", file=sys.stderr)
        return report.exit_code
    for p in report.problems:
        print(f"{'fixed' if p.fixed else 'problem'}: {p.what}: {p.message}")
    if not report.problems:
        print(f"{args.path}: clean ({report.files} files, {report.used_units} units used)")
    elif report.repaired:
        print(f"{args.path}: {len(report.problems)} problems found and repaired")
    else:
        print(f"{args.path}: {len(report.problems)} problems found; run with --repair to fix them")
    return report.exit_code


def cmd_defrag(args: argparse.Namespace) -> int:
    with Volume.open(args.path) as vol:
        _warn(vol)
        todo = defrag_mod.fragmented(vol)
        total = sum(n for _, n in todo) * vol.sb.unit_size
        with Progress("defrag", total) as bar:
            result = defrag_mod.defrag(vol, progress=bar.advance)
    if args.json:
        _print_json({"moved": result.moved, "already_contiguous": result.already,
                     "skipped": result.skipped, "bytes_moved": result.bytes_moved})
        return 0
    for why in result.skipped:
        print(f"skipped {why}")
    print(f"defragmented {len(result.moved)} files ({format_size(result.bytes_moved)} moved); "
          f"{result.already} were already contiguous")
    return 0 if not result.skipped else 1


# ---- shoal file ------------------------------------------------------------------------

def _register_file(sub: Any) -> None:
    p = sub.add_parser("file", help="list, create, copy in and out, and remove files on a volume")
    fs = p.add_subparsers(dest="file_command", metavar="ACTION", required=True)

    from shoal.config import locate

    def add(name: str, helptext: str, handler: Any) -> argparse.ArgumentParser:
        a = fs.add_parser(name, help=helptext + " (VOLUME:/path online through this node's agent, "
                          "or --volume IMAGE offline)")
        a.add_argument("--volume", metavar="PATH", help="offline: a volume image or block device no cluster uses")
        locate.add_arguments(a)
        a.set_defaults(handler=_file_handler(handler))
        return a

    a = add("ls", "list a directory", cmd_ls)
    a.add_argument("path", nargs="?", default="/")
    a.add_argument("-l", action="store_true", help="long listing")
    a.add_argument("--json", action="store_true")
    a = add("stat", "size, allocation and extents of a file", cmd_stat)
    a.add_argument("path")
    a.add_argument("--json", action="store_true")
    a = add("mkdir", "make a directory", cmd_mkdir)
    a.add_argument("path")
    a.add_argument("-p", "--parents", action="store_true", help="make missing parents too")
    a = add("rm", "remove a file or directory", cmd_rm)
    a.add_argument("path")
    a.add_argument("-r", "--recursive", action="store_true")
    a = add("mv", "rename or move", cmd_mv)
    a.add_argument("src")
    a.add_argument("dst")
    a = add("truncate", "set a file's size, creating it if missing", cmd_truncate)
    a.add_argument("path")
    a.add_argument("--size", required=True)
    a.add_argument("--preallocate", action="store_true", help="a new file is thick: every unit allocated and zeroed")
    a = add("import", "copy a host file into the volume (holes stay holes)", cmd_import)
    a.add_argument("src", help="host file or device")
    a.add_argument("dst", help="path on the volume")
    a.add_argument("--preallocate", action="store_true", help="make a thick file")
    a.add_argument("--force", action="store_true", help="replace an existing file")
    a = add("export", "copy a volume file to the host (sparse)", cmd_export)
    a.add_argument("src", help="path on the volume")
    a.add_argument("dst", help="host file")
    a.add_argument("--force", action="store_true", help="overwrite an existing host file")


def _file_handler(offline: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        if args.volume is not None:
            return int(offline(args))
        from shoal.cli import online

        return online.file_online(args)

    return run


def _stat_line(st: Stat) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.mtime_ns / 1e9))
    kind = "d" if st.kind == "directory" else ("p" if st.preallocated else "-")
    return f"{kind} {st.size:>14} {st.allocated:>14} {when} {st.path}"


def cmd_ls(args: argparse.Namespace) -> int:
    with Volume.open(args.volume, writable=False) as vol:
        _warn(vol)
        entries = vol.listdir(args.path)
    if args.json:
        _print_json([e.to_json() for e in entries])
    elif args.l:
        print(f"{'t':1} {'size':>14} {'allocated':>14} {'modified':16} path")
        for e in entries:
            print(_stat_line(e))
    else:
        for e in entries:
            print(e.path.rsplit("/", 1)[-1] + ("/" if e.kind == "directory" else ""))
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    with Volume.open(args.volume, writable=False) as vol:
        _warn(vol)
        st = vol.stat(args.path)
        extents = vol.open_file(args.path).extent_map() if st.kind == "file" else []
    if args.json:
        _print_json({**st.to_json(), "extent_map": [{"offset": o, "lun_offset": lo, "length": n} for o, lo, n in extents]})
        return 0
    print(f"path        {st.path}\nkind        {st.kind}{' (preallocated)' if st.preallocated else ''}")
    print(f"size        {st.size} ({format_size(st.size)})\nallocated   {st.allocated} ({format_size(st.allocated)})")
    print(f"extents     {st.extents}")
    for o, lo, n in extents:
        print(f"  file {o:>14} -> lun {lo:>14}  {format_size(n)}")
    return 0


def cmd_mkdir(args: argparse.Namespace) -> int:
    with Volume.open(args.volume) as vol:
        _warn(vol)
        vol.mkdir(args.path, parents=args.parents)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with Volume.open(args.volume) as vol:
        _warn(vol)
        vol.remove(args.path, recursive=args.recursive)
    return 0


def cmd_mv(args: argparse.Namespace) -> int:
    with Volume.open(args.volume) as vol:
        _warn(vol)
        vol.rename(args.src, args.dst)
    return 0


def cmd_truncate(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    with Volume.open(args.volume) as vol:
        _warn(vol)
        if vol.exists(args.path):
            vol.resize(args.path, size)
        else:
            vol.create(args.path, size, preallocate=args.preallocate)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import os

    total = os.path.getsize(args.src) if os.path.isfile(args.src) else 0
    with Volume.open(args.volume) as vol:
        _warn(vol)
        with Progress(f"import {args.dst}", total) as bar:
            written = transfer.import_file(vol, args.src, args.dst, preallocate=args.preallocate,
                                           force=args.force, progress=bar.advance)
        st = vol.stat(args.dst)
    print(f"imported {args.src} -> {args.dst}: {format_size(st.size)}, {format_size(written)} of data, "
          f"{format_size(st.allocated)} allocated")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with Volume.open(args.volume, writable=False) as vol:
        _warn(vol)
        size = vol.stat(args.src).size
        with Progress(f"export {args.src}", size) as bar:
            written = transfer.export_file(vol, args.src, args.dst, force=args.force, progress=bar.advance)
    print(f"exported {args.src} -> {args.dst}: {format_size(size)}, {format_size(written)} of data")
    return 0
