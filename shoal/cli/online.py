"""Online commands: ask this node's agent (control socket), which asks the cluster.

``shoal volume ls|move|maintenance|repair``, ``shoal nbd path`` and ``shoal file ...``
with ``VOLUME:/path`` arguments (instead of ``--volume IMAGE`` for the offline form).
File data for ``import``/``export`` travels over this node's NBD socket, like a VM's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from shoal.agent.control import request
from shoal.config import locate
from shoal.errors import UsageError
from shoal.util.sizes import format_size, parse_size

CHUNK = 4 << 20
LONG_TIMEOUT_S = 3600.0


def _agent(args: argparse.Namespace, op: str, timeout_s: float = 60.0, **kw: Any) -> Any:
    cfg, node = locate.resolve(args)
    return request(cfg.control_socket(node), op, timeout_s=timeout_s, **kw)


def split_target(text: str) -> tuple[str, str]:
    """``vol1:/dir/file`` -> (``vol1``, ``/dir/file``)."""
    vol, sep, path = text.partition(":")
    if not sep or not vol or not path.startswith("/"):
        raise UsageError(f"{text!r} is not VOLUME:/path (for example vol1:/vm/disk0.raw); "
                         "for an image file that no cluster uses, pass --volume IMAGE instead")
    return vol, path


# ---- shoal volume ls / move / maintenance / repair -------------------------------------

def cmd_volume_ls(args: argparse.Namespace) -> int:
    volumes = _agent(args, "volume_ls")
    if args.json:
        print(json.dumps(volumes, indent=2))
        return 0
    for v in volumes:
        flag = "  MAINTENANCE" if v["maintenance"] else ""
        print(f"{v['volume']}: coordinator {v['coordinator'] or '(none)'}, epoch {v['epoch']}{flag}")
        print(f"  {'node':10} {'state':12} {'reasons':24} {'direct':>18} {'redirected':>18}")
        for name, n in v["nodes"].items():
            c = n.get("counters") or {}
            direct = f"{format_size(c.get('direct_bytes', 0))}/{c.get('direct_requests', 0)}"
            redir = f"{format_size(c.get('redirected_bytes', 0))}/{c.get('redirected_requests', 0)}"
            reasons = ",".join(n.get("reasons") or []) or "-"
            print(f"  {name:10} {n.get('state', '?'):12} {reasons:24} {direct:>18} {redir:>18}")
    return 0


def cmd_volume_move(args: argparse.Namespace) -> int:
    r = _agent(args, "volume_move", volume=args.volume, to=args.to)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{args.volume}: coordinator moved {r['from']} -> {r['to']} (epoch {r['epoch']}); "
              f"I/O needing the coordinator paused {r['paused_ms']:.1f} ms")
    return 0


def cmd_volume_maintenance(args: argparse.Namespace) -> int:
    r = _agent(args, "volume_maintenance", volume=args.volume, on=args.mode == "on")
    print(f"{args.volume}: maintenance {'on' if r['maintenance'] else 'off'} (coordinator {r['coordinator']})"
          + (f"; not reached: {', '.join(r['unreached'])}" if r["unreached"] else ""))
    return 0


def cmd_volume_repair(args: argparse.Namespace) -> int:
    kind = "defrag" if args.defrag else "fsck"
    r = _agent(args, "volume_repair", timeout_s=LONG_TIMEOUT_S, volume=args.volume, kind=kind)
    if args.json:
        print(json.dumps(r, indent=2))
        return 1 if r["problems"] else 0
    rep = r["report"]
    if kind == "defrag":
        print(f"{args.volume}: defrag on {r['coordinator']} under maintenance mode: moved {len(rep['moved'])} "
              f"file(s), {format_size(rep['bytes_moved'])}; {rep['already']} already contiguous "
              f"({r['seconds']:.1f} s)")
        for s in rep["skipped"]:
            print(f"  skipped: {s}")
    else:
        probs = rep.get("problems") or []
        print(f"{args.volume}: fsck on {r['coordinator']} under maintenance mode: "
              f"{len(probs)} problem(s){', repaired' if rep.get('repaired') else ''} ({r['seconds']:.1f} s)")
        for p in probs:
            print(f"  {p.get('what')}: {p.get('message')}")
        if rep.get("error"):
            print(f"  error: {rep['error']}")
    return 1 if r["problems"] else 0


# ---- shoal nbd path --------------------------------------------------------------------

def cmd_nbd_path(args: argparse.Namespace) -> int:
    vol, path = split_target(args.target)
    r = _agent(args, "nbd_path", volume=vol, file=path)
    print(json.dumps(r, indent=2) if args.json else r["uri"])
    return 0


# ---- shoal file ... VOLUME:/path -----------------------------------------------------------

def _meta(args: argparse.Namespace, volume: str, op: str, **kw: Any) -> Any:
    return _agent(args, "file", volume=volume, fop=op, fargs=kw)


def file_online(args: argparse.Namespace) -> int:
    cmd = args.file_command
    if cmd in ("mv", "import", "export"):
        return {"mv": _mv, "import": _import, "export": _export}[cmd](args)
    vol, path = split_target(args.path)
    if cmd == "ls":
        entries = _meta(args, vol, "list", path=path)["entries"]
        if args.json:
            print(json.dumps(entries, indent=2))
        for e in [] if args.json else entries:
            name = str(e["path"]).rsplit("/", 1)[-1] + ("/" if e["kind"] == "directory" else "")
            print(f"{e['size']:>14} {e['allocated']:>14} {name}" if args.l else name)
    elif cmd == "stat":
        st = _meta(args, vol, "stat", path=path)
        print(json.dumps(st, indent=2) if args.json else
              "\n".join(f"{k:12}{v}" for k, v in st.items()))
    elif cmd == "mkdir":
        _meta(args, vol, "mkdir", path=path, parents=bool(args.parents))
    elif cmd == "rm":
        _remove(args, vol, path, recursive=bool(args.recursive))
    elif cmd == "truncate":
        size = parse_size(args.size, "--size")
        try:
            _meta(args, vol, "resize", path=path, size=size)
        except Exception as err:  # noqa: BLE001 - "not found" means create it
            if "not" not in str(err).lower() and "no such" not in str(err).lower():
                raise
            _meta(args, vol, "create", path=path, size=size, preallocate=bool(args.preallocate))
    return 0


def _remove(args: argparse.Namespace, vol: str, path: str, *, recursive: bool) -> None:
    st = _meta(args, vol, "stat", path=path)
    if st["kind"] == "directory" and recursive:
        for e in _meta(args, vol, "list", path=path)["entries"]:
            _remove(args, vol, str(e["path"]), recursive=True)
    _meta(args, vol, "remove", path=path)


def _mv(args: argparse.Namespace) -> int:
    vol, src = split_target(args.src)
    vol2, dst = split_target(args.dst) if ":" in args.dst else (vol, args.dst)
    if vol2 != vol:
        raise UsageError("mv cannot move a file between volumes; use export and import")
    _meta(args, vol, "rename", src=src, dst=dst)
    return 0


def _nbd_client(args: argparse.Namespace, vol: str, path: str) -> Any:
    from shoal.nbd.client import NBDClient

    r = _agent(args, "nbd_path", volume=vol, file=path)
    return NBDClient.connect(r["socket"], r["export"], allocation=True)


def _import(args: argparse.Namespace) -> int:
    vol, dst = split_target(args.dst)
    try:
        size = os.path.getsize(args.src)
        fd = os.open(args.src, os.O_RDONLY)
    except OSError as err:
        raise UsageError(f"cannot read {args.src}: {err.strerror}") from err
    if args.force:
        try:
            _meta(args, vol, "remove", path=dst)
        except Exception:  # noqa: BLE001 - absent is fine
            pass
    _meta(args, vol, "create", path=dst, size=size, preallocate=bool(args.preallocate))

    async def copy() -> int:
        client = await _nbd_client(args, vol, dst)
        written = 0
        try:
            for off in range(0, size, CHUNK):
                data = os.pread(fd, min(CHUNK, size - off), off)
                if data.count(0) != len(data):
                    await client.write(off, data)
                    written += len(data)
            await client.flush()
        finally:
            await client.close()
        return written

    try:
        written = asyncio.run(copy())
    finally:
        os.close(fd)
    print(f"imported {args.src} -> {vol}:{dst}: {format_size(size)}, {format_size(written)} of data")
    return 0


def _export(args: argparse.Namespace) -> int:
    vol, src = split_target(args.src)
    if os.path.exists(args.dst) and not args.force:
        raise UsageError(f"{args.dst} exists; pass --force to overwrite it")

    async def copy() -> int:
        client = await _nbd_client(args, vol, src)
        fd = os.open(args.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, client.size)
            for off in range(0, client.size, CHUNK):
                data = await client.read(off, min(CHUNK, client.size - off))
                if data.count(0) != len(data):
                    os.pwrite(fd, data, off)
            os.fsync(fd)
            return int(client.size)
        finally:
            os.close(fd)
            await client.close()

    size = asyncio.run(copy())
    print(f"exported {vol}:{src} -> {args.dst}: {format_size(size)}", file=sys.stdout)
    return 0
