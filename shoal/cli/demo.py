"""``shoal demo``: a narrated tour for a newcomer, on real files, that cleans up after itself.

Part 1, the shared volume: format, import a sparse VM disk, look at it, export it back
byte-identical, check it. Part 2, the cluster: three hosts in network namespaces with
their cluster networks and metrics, a real link fault and the failover of internal
traffic, then the restore. Part 3, Cluster Shared Volumes: a writer on a node that is
not the coordinator, its storage link cut (redirected, no I/O error) and restored
(direct again by itself), the coordinator moved and the pause printed. Part 4, VMs: a
test VM whose disk is a file on the shared volume live-migrates around the cluster;
each hop prints its downtime and the network it used, and the guest's memory is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.util.sizes import format_size
from shoal.volume import fsck, transfer
from shoal.volume.format import format_volume
from shoal.volume.volume import Volume


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="a narrated tour of shoal on this machine (cleans up after itself)")
    p.add_argument("--dir", help="work here and keep the files (default: a temporary directory, removed)")
    p.add_argument("--volume-only", action="store_true", help="skip the cluster part (no lab)")
    p.set_defaults(handler=cmd_demo)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _make_disk(path: str, size: int) -> int:
    """A sparse 'VM disk' with data in three places; returns bytes of data."""
    with open(path, "wb") as f:
        f.truncate(size)
        data = 0
        for offset, length in ((0, 1 << 20), (size // 2, 3 << 20), (size - (2 << 20), 2 << 20)):
            f.seek(offset)
            f.write(hashlib.sha256(str(offset).encode()).digest() * (length // 32))
            data += length
    return data


def cmd_demo(args: argparse.Namespace) -> int:
    work = args.dir or tempfile.mkdtemp(prefix="shoal-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        ok = _run(work)
        if not args.volume_only:
            ok = _cluster(work) and ok
        _say("Done. Next: `./run test` runs the whole suite; README.md lists the commands.")
        return 0 if ok else 1
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
            print(f"\nremoved {work}")


def _run(work: str) -> bool:
    lun = os.path.join(work, "lun.img")
    disk = os.path.join(work, "vm-disk.raw")
    back = os.path.join(work, "vm-disk.exported.raw")
    _say("A shared volume lives on a LUN. Here the LUN is a sparse image file.")
    sb = format_volume(lun, 1 << 30, name="vol1", force=True)
    print(f"formatted {lun}: {format_size(sb.volume_size)}, {sb.unit_count} allocation units of "
          f"{format_size(sb.unit_size)}, journal {format_size(sb.journal_size)}")

    _say("A VM disk is a sparse file: 256 MiB, of which only 6 MiB hold data.")
    data = _make_disk(disk, 256 << 20)
    print(f"{disk}: {format_size(os.path.getsize(disk))} with {format_size(data)} of data")

    _say("Import it into the volume. Holes stay holes: only units with data are allocated.")
    with Volume.open(lun) as vol:
        vol.mkdir("/vms/web1", parents=True)
        transfer.import_file(vol, disk, "/vms/web1/disk0.raw")
        st = vol.stat("/vms/web1/disk0.raw")
        print(f"/vms/web1/disk0.raw: size {format_size(st.size)}, allocated {format_size(st.allocated)} "
              f"in {st.extents} extents")
        for offset, lun_offset, length in vol.open_file(st.path).extent_map():
            print(f"  file bytes {offset:>10} .. {offset + length:>10}  ->  LUN byte {lun_offset}")
        print("every node of a cluster reads and writes these LUN offsets directly; "
              "only the coordinator changes the map")

    _say("Export it back and compare: byte-identical, and still sparse.")
    with Volume.open(lun, writable=False) as vol:
        transfer.export_file(vol, "/vms/web1/disk0.raw", back)
    same = _sha256(disk) == _sha256(back)
    used = os.stat(back).st_blocks * 512
    print(f"sha256 identical: {same}; exported file occupies {format_size(used)} on the host disk")

    _say("Check the volume, as chkdsk would: checksums, namespace, extents, allocation.")
    report = fsck.fsck(lun)
    print("clean" if report.exit_code == 0 else f"problems: {[p.message for p in report.problems]}")

    return same and report.exit_code == 0


def _wait(cond: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until ``cond`` held, or None if it did not within ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - an agent still starting answers nothing yet
            pass
        time.sleep(0.1)
    return None


def _after(seconds: float | None) -> str:
    return "did not happen within the time allowed" if seconds is None else f"after {seconds:.1f} s"


def _cluster(work: str) -> bool:
    from shoal.agent.control import request
    from shoal.lab.lab import Lab

    lab_dir = os.path.join(work, "lab")
    lab = Lab(Path(lab_dir))
    _say("Part 2: a cluster of three hosts on this machine (network namespaces), each with an "
         "agent,\n   three cluster networks and a storage network with an NBD target serving the LUN.")
    st = lab.up(3, name="demo", say=lambda s: None)
    try:
        def status(node: str) -> dict[str, Any]:
            return dict(request(Path(st.dir) / "run" / f"{node}.sock", "status", timeout_s=5))

        def internal(a: str, b: str) -> str:
            return str(status(a)["routes"][b]["internal"])

        def all_up() -> bool:
            return all(status(a)["nodes"][b]["state"] == "up" for a in st.nodes for b in st.nodes if a != b)

        took = _wait(all_up, 30)
        when = "not yet" if took is None else f"after {took:.1f} s"
        print(f"{len(st.nodes)} agents up and heartbeating each other on every network ({when}); mode: {st.mode}")
        _say("Networks get metrics as in Windows Server 2008 R2: cluster-only 1000, 1100…, "
             "cluster-and-client 10000…\n   Internal traffic takes the lowest metric, live migration the second-lowest.")
        subprocess.run([sys.executable, "-m", "shoal", "lab", "exec", "--dir", lab_dir, "node1", "--",
                        sys.executable, "-m", "shoal", "network", "ls"], check=False)
        _say("Cut node2's link on the 'cluster' network (a real link down). After 5 missed heartbeats "
             "internal\n   traffic between node2 and the others moves to the next network; nobody is declared down.")
        lab.set_link("node2", "cluster", up=False)
        moved = _wait(lambda: internal("node1", "node2") == "migration", 15)
        still_up = status("node1")["nodes"]["node2"]["state"] == "up"
        print(f"node1 -> node2 internal traffic now on: {internal('node1', 'node2')} "
              f"({_after(moved)}); node2 is {'up' if still_up else 'DOWN'}")
        _say("Restore the link: traffic returns after 3 good heartbeats in a row (hysteresis).")
        lab.set_link("node2", "cluster", up=True)
        back = _wait(lambda: internal("node1", "node2") == "cluster", 15)
        print(f"node1 -> node2 internal traffic back on: {internal('node1', 'node2')} ({_after(back)})")
        nets_ok = took is not None and moved is not None and still_up and back is not None
        csv_ok = _shared_volume(lab, st, lab_dir)
        return _vms(st) and csv_ok and nets_ok
    finally:
        lab.down("demo")
        print("lab removed: namespaces, agents, storage target and files")


def _shared_volume(lab: Any, st: Any, lab_dir: str) -> bool:
    """Part 3: direct and redirected I/O, and a coordinator move, under a checking writer."""
    import json

    from shoal.agent.control import request

    def ls() -> dict[str, Any]:
        return dict(request(Path(st.dir) / "run" / "node1.sock", "volume_ls", timeout_s=20)[0])

    def show() -> None:
        subprocess.run([sys.executable, "-m", "shoal", "lab", "exec", "--dir", lab_dir, "node1", "--",
                        sys.executable, "-m", "shoal", "volume", "ls"], check=False)

    _say("Part 3: Cluster Shared Volumes. The LUN is formatted as volume vol1; every node uses it at once.\n"
         "   One node, the coordinator, owns the metadata; every node reads and writes data directly.")
    ready = _wait(lambda: bool(ls()["coordinator"]) and all(v["state"] == "direct" for v in ls()["nodes"].values()),
                  60)
    coord = ls()["coordinator"]
    print(f"coordinator: {coord} ({_after(ready)})")
    node = next(n for n in st.nodes if n != coord)
    sock = Path(st.dir) / "run" / f"{node}.sock"
    request(sock, "file", volume="vol1", fop="mkdir", fargs={"path": "/vms", "parents": True})
    request(sock, "file", volume="vol1", fop="create", fargs={"path": "/vms/web1.raw", "size": 256 << 20})
    uri = request(sock, "nbd_path", volume="vol1", file="/vms/web1.raw")["uri"]
    _say(f"A writer on {node} (not the coordinator) writes and verifies a VM disk through {node}'s NBD socket:\n"
         f"   {uri}")
    stop = Path(st.dir) / "stop-demo-writer"
    writer = subprocess.Popen(
        ["ip", "netns", "exec", st.ns(node), sys.executable, "-m", "shoal.lab.writer", "--socket",
         uri.split("socket=")[1], "--export", "vms/web1.raw", "--seconds", "600", "--stop-file", str(stop),
         "--blocks", "2048"] if st.mode == "netns" else
        [sys.executable, "-m", "shoal.lab.writer", "--socket", uri.split("socket=")[1], "--export",
         "vms/web1.raw", "--seconds", "600", "--stop-file", str(stop), "--blocks", "2048"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    show()
    _say(f"Cut {node}'s storage link (a real link down). Its I/O times out, what was queued on the path is\n"
         f"   aborted, and {node} goes 'redirected': its blocks travel to {coord}, which writes them.")
    lab.set_link(node, "storage", up=False)
    red = _wait(lambda: ls()["nodes"][node]["state"] == "redirected", 30)
    time.sleep(2)
    print(f"{node} redirected {_after(red)}; reasons: {', '.join(ls()['nodes'][node]['reasons'])}")
    show()
    _say(f"Restore the link: {node} notices by itself and returns to direct I/O.")
    lab.set_link(node, "storage", up=True)
    back = _wait(lambda: ls()["nodes"][node]["state"] == "direct", 30)
    print(f"{node} direct again {_after(back)}")
    target = next(n for n in st.nodes if n != coord and n != node)
    _say(f"Move the coordinator role {coord} -> {target} while the writer runs (planned, like Move-ClusterSharedVolume).")
    moved = request(Path(st.dir) / "run" / "node1.sock", "volume_move", timeout_s=60, volume="vol1", to=target)
    print(f"coordinator now {moved['to']} (epoch {moved['epoch']}); I/O needing the coordinator paused "
          f"{moved['paused_ms']:.0f} ms")
    time.sleep(2)
    stop.touch()
    out, _ = writer.communicate(timeout=300)
    result = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    _say("The writer's verdict: every block it read back held the last write it was told had succeeded.")
    print(f"{result.get('writes', 0)} writes, {result.get('errors', '?')} I/O errors, "
          f"{result.get('mismatches', '?')} bad blocks, longest wait {result.get('max_latency_ms', '?')} ms")
    ok = (ready is not None and red is not None and back is not None and result.get("errors") == 0
          and result.get("mismatches") == 0)
    return bool(ok)


def _vms(st: Any) -> bool:
    """Part 4: a test VM live-migrates node1 -> node2 -> node3 -> node1, checked after each hop."""
    from shoal.agent.control import request

    def ctl(op: str, timeout_s: float = 300, **kw: Any) -> Any:
        return request(Path(st.dir) / "run" / "node1.sock", op, timeout_s=timeout_s, **kw)

    _say("Part 4: VMs. A test VM keeps incrementing one byte in every page of its memory; its disk is a file\n"
         "   on vol1, attached through each node's NBD socket, so moving the VM moves no disk.")
    spec = {"name": "demo1", "memory_mib": 64, "cpus": 1, "test_guest": "memory", "dirty_rate_mib_s": 8,
            "disks": [{"volume": "vol1", "path": "/vms/demo1.raw", "size": 1 << 20}]}
    started = ctl("vm_create", spec=spec, start=False)
    s = ctl("vm_start", name="demo1", on="node1")
    print(f"demo1 defined ({', '.join(started['created_disks']) or 'disk existed'}) and running on {s['node']} "
          f"under {s['accel'].upper()}: {s['accel_reason']}")
    ok = True
    time.sleep(1)
    for dst in ("node2", "node3", "node1"):
        m = ctl("vm_migrate", timeout_s=900, name="demo1", to=dst)
        v = ctl("vm_verify", name="demo1", timeout_s=120)
        ok = ok and bool(v["ok"])
        print(f"  {m['from']} -> {m['to']} over '{m['network']}': downtime {m['downtime_ms']} ms, total "
              f"{m['total_ms']} ms, {format_size(int(m.get('transferred_bytes') or 0))} copied; memory check: "
              f"{'OK' if v['ok'] else 'FAILED'}")
    print("the network is 'migration', the second-lowest metric: internal traffic keeps the lowest to itself")
    ctl("vm_stop", name="demo1", force=True)
    ctl("vm_delete", name="demo1")
    return ok
