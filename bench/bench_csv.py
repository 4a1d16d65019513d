#!/usr/bin/env python3
"""Cluster Shared Volumes in a real 3-node lab, each measure against a peer in the same run.

1. Direct I/O through a node's agent vs qemu-nbd serving a raw file from the storage
   target's host (the switch namespace), both driven by ``qemu-img bench -t none`` from
   the same non-coordinator node: 1 MiB sequential write and read (depth 8), 4 KiB
   strided write and read (depth 16). Ratio = qemu-nbd time / shoal time. Goal >= 0.9.
2. Redirected vs direct, 1 MiB sequential write and read from the same node: its storage
   link is taken down so every block travels through the coordinator. Ratio = direct
   time / redirected time. Goal >= 0.7. The node's redirected counters must grow.
   Direct and redirected passes take turns (the link goes down and up each round).
3. Allocation round trip from a non-coordinator (``volume_probe_alloc``: one allocation
   request per unit of a sparse file). Goal p50 <= 2 ms.
4. Coordinator move under load: a checking writer (``shoal.lab.writer``) on every node,
   the role moved three times. Goal: each move pauses <= 100 ms (the agent's
   ``paused_ms``) and no request that was in flight during a move (sent before 1 s
   after its answer, answered after it began) took longer than 100 ms while the machine
   ran: a real-time process that sleeps 1 ms at a time records when the whole machine
   stalled (no CPU load delays it; a VM whose host does not run it does), and a request
   that overlapped such a stall is printed but not judged. The longest request at any other time is printed beside it. A writer
   error or a block that lost its last acknowledged write fails the run.

Timed measures run ``--repeat`` times; the best run counts (least disturbed by other
load). The lab has default timing (I/O timeout T = 1 s) and is always torn down. It
lives in ``--dir``: by default /dev/shm when that is a tmpfs with room, so that the LUN
and the peer's image are in RAM and the host disk's writeback (which stalls writers at
random while gigabytes of dirty pages are flushed) stays out of both sides' figures.
Exit status 1 means something broke, never that a goal was missed.

    python bench/bench_csv.py [--repeat 3] [--size 1G] [--quick] [--only direct|redirected|alloc|move ...] [--dir DIR] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shoal.agent.control import request
from shoal.lab.lab import Lab, LabState
from shoal.util.sizes import format_size, parse_size

LAB_NAME = "bcsv"
VOLUME = "vol1"
MiB = 1 << 20
PEER_PORT = 10810
PEER_EXPORT = "peer"
#: a prime number of 4 KiB blocks: coprime with any power-of-two image size, so the
#: strided cases visit every block once before repeating, in a scattered order
STRIDE_4K = 7919 * 4096
BENCH_TIMEOUT_S = 600.0
STATE_TIMEOUT_S = 60.0

GOAL_DIRECT_RATIO = 0.9
GOAL_REDIRECT_RATIO = 0.7
GOAL_ALLOC_P50_MS = 2.0
GOAL_MOVE_MS = 100.0
SLOW_MS = 20.0  # writers list requests slower than this, with when they were sent
#: a request sent this long after a move's answer still counts as one the move may have
#: delayed (the nodes learn of the new coordinator and fetch maps from it)
MOVE_AFTERMATH_S = 1.0


class Broken(Exception):
    """Something did not work (as opposed to: a goal was missed)."""


@dataclass(frozen=True)
class Case:
    name: str
    write: bool
    size: str
    depth: int
    count: int
    step: int = 0  # 0: sequential (each request follows the previous one)


def io_cases(quick: bool, image: int) -> list[Case]:
    big = image // MiB  # the whole file once
    small = 4000 if quick else 10000
    return [
        Case("1M seq write d8", True, "1M", 8, big),
        Case("1M seq read  d8", False, "1M", 8, big),
        Case("4K strided write d16", True, "4k", 16, small, STRIDE_4K),
        Case("4K strided read  d16", False, "4k", 16, small, STRIDE_4K),
    ]


# -- the lab ------------------------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab
    st: LabState
    #: processes this benchmark started (killed in teardown, by pid)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def sock(self, node: str) -> Path:
        return Path(self.st.dir) / "run" / f"{node}.sock"

    def req(self, node: str, op: str, timeout_s: float = 60, **args: Any) -> Any:
        return request(self.sock(node), op, timeout_s=timeout_s, **args)

    def volume(self, via: str) -> dict[str, Any]:
        return next(v for v in self.req(via, "volume_ls", timeout_s=20) if v["volume"] == VOLUME)

    def view(self, node: str) -> dict[str, Any]:
        return dict(self.volume(node)["nodes"][node])

    def coordinator(self) -> str | None:
        for node in self.st.nodes:
            try:
                c = self.volume(node)["coordinator"]
            except Exception:  # noqa: BLE001 - ask the next node
                continue
            if c:
                return str(c)
        return None

    def file(self, node: str, fop: str, **fargs: Any) -> Any:
        return self.req(node, "file", timeout_s=300, volume=VOLUME, fop=fop, fargs=fargs)

    def uri(self, node: str, path: str) -> str:
        return str(self.req(node, "nbd_path", volume=VOLUME, file=path)["uri"])

    def in_ns(self, node: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.st.ns(node), *cmd]

    def move(self, to: str) -> dict[str, Any]:
        return dict(self.req(self.st.nodes[0], "volume_move", timeout_s=120, volume=VOLUME, to=to))


def wait(cond: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Poll ``cond`` until true; the seconds it took. Raises Broken when it never is."""
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout_s:
        try:
            if cond():
                return time.monotonic() - t0
        except Broken:
            raise
        except Exception as err:  # noqa: BLE001 - an agent may be busy; keep asking
            last = err
        time.sleep(0.1)
    raise Broken(f"{what}: not true within {timeout_s:g} s" + (f" (last error: {last})" if last else ""))


def all_direct(c: Cluster) -> bool:
    v = c.volume(c.st.nodes[0])
    return bool(v["coordinator"]) and all(n["state"] == "direct" for n in v["nodes"].values())


def coordinator_is(c: Cluster, node: str) -> Callable[[], bool]:
    return lambda: c.coordinator() == node


def qemu_bench(cmd_prefix: list[str], uri: str, case: Case) -> float:
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-s", case.size, "-d", str(case.depth),
           "-c", str(case.count)]
    if case.step:
        cmd += ["-S", str(case.step)]
    if case.write:
        cmd.append("-w")
    p = subprocess.run([*cmd_prefix, *cmd, uri], capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    match = re.search(r"Run completed in ([\d.]+) seconds", p.stdout)
    if p.returncode != 0 or not match:
        raise Broken(f"qemu-img bench on {uri} failed ({p.returncode}): {p.stdout.strip()} {p.stderr.strip()}")
    return float(match.group(1))


def verdict(ok: bool) -> str:
    return "goal met" if ok else "goal MISSED"


# -- 1. direct I/O vs qemu-nbd ------------------------------------------------------


def start_peer(c: Cluster, image: Path, node: str) -> str:
    """qemu-nbd on the storage target's host, reachable over the storage network."""
    host = urlsplit(c.st.target).hostname
    proc = subprocess.Popen(
        ["ip", "netns", "exec", c.st.switch, "qemu-nbd", "-f", "raw", "-t", "-e", "64", "--cache=writeback",
         "-x", PEER_EXPORT, "--bind", str(host), "--port", str(PEER_PORT), str(image)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    c.procs.append(proc)
    uri = f"nbd://{host}:{PEER_PORT}/{PEER_EXPORT}"

    def answers() -> bool:
        if proc.poll() is not None:
            raise Broken(f"qemu-nbd exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        return subprocess.run(c.in_ns(node, ["qemu-img", "info", uri]), capture_output=True).returncode == 0

    wait(answers, 20, f"qemu-nbd answers at {uri}")
    return uri


def direct_vs_qemu_nbd(c: Cluster, node: str, size: int, cases: list[Case], repeat: int) -> None:
    t0 = time.monotonic()
    c.file(node, "create", path="/thick.raw", size=size, preallocate=True)
    took = time.monotonic() - t0
    allocated = int(c.file(node, "stat", path="/thick.raw")["allocated"])
    if allocated < size:
        raise Broken(f"/thick.raw was created with preallocate but has only {allocated} of {size} bytes allocated")
    print(f"  thick {format_size(size)} /thick.raw created from {node} in {took:.1f} s")
    peer_image = Path(c.st.dir) / "bench-peer.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(peer_image), str(size)], check=True)
    uris = {"shoal": c.uri(node, "/thick.raw"), "qemu-nbd": start_peer(c, peer_image, node)}
    ns = c.in_ns(node, [])
    # one untimed pass writes every block on both sides, so neither pays for first allocation
    fill = Case("fill", True, "1M", 8, size // MiB)
    for server in uris:
        qemu_bench(ns, uris[server], fill)
    print(f"  shoal    {uris['shoal']}")
    print(f"  qemu-nbd {uris['qemu-nbd']} (in {c.st.switch}, over the storage network)")
    print(f"  {'case':22} {'qemu-nbd s':>10} {'shoal s':>9} {'ratio':>7}")
    peer_times = {}
    for case in cases:
        best = {"shoal": float("inf"), "qemu-nbd": float("inf")}
        for _ in range(repeat):
            for server in ("qemu-nbd", "shoal"):
                best[server] = min(best[server], qemu_bench(ns, uris[server], case))
        peer_times[case.name] = best["qemu-nbd"]
        ratio = best["qemu-nbd"] / best["shoal"]
        print(f"  {case.name:22} {best['qemu-nbd']:10.3f} {best['shoal']:9.3f} {ratio:6.2f}x  "
              f"({case.count} ops)  {verdict(ratio >= GOAL_DIRECT_RATIO)} (>= {GOAL_DIRECT_RATIO}x)")
    small = [case for case in cases if case.size == "4k"]
    if len(small) == 2 and peer_times[small[0].name] > 5 * peer_times[small[1].name]:
        # qemu-img's NBD client over TCP (qemu 7.2) leaves Nagle on: with several small
        # writes in flight each one can wait for a delayed ACK (~40 ms); not a server cost
        print("  note: qemu-nbd's small writes over TCP most likely wait on Nagle / delayed ACKs in qemu-img's NBD "
              "client; that ratio flatters shoal")


# -- 2. redirected vs direct --------------------------------------------------------


def redirected_vs_direct(c: Cluster, node: str, cases: list[Case], repeat: int) -> None:
    """Direct and redirected passes in turns (the link goes down and up each round), so
    that a slow spell of the machine does not fall on one side only; best of each."""
    uri = c.uri(node, "/thick.raw")
    ns = c.in_ns(node, [])
    direct: dict[str, list[float]] = {case.name: [] for case in cases}
    redirected: dict[str, list[float]] = {case.name: [] for case in cases}
    grew = {"redirected_requests": 0, "redirected_bytes": 0}
    for _ in range(repeat):
        for case in cases:
            direct[case.name].append(qemu_bench(ns, uri, case))
        c.lab.set_link(node, "storage", up=False)
        try:
            took = wait(lambda: c.view(node)["state"] == "redirected", STATE_TIMEOUT_S, f"{node} redirected")
            print(f"  {node} storage link down: redirected after {took:.1f} s")
            before = c.view(node)["counters"]
            for case in cases:
                redirected[case.name].append(qemu_bench(ns, uri, case))
            after = c.view(node)
        finally:
            c.lab.set_link(node, "storage", up=True)
        if after["state"] != "redirected":
            raise Broken(f"{node} left 'redirected' during a redirected pass (now {after['state']})")
        for k in grew:
            grew[k] += after["counters"][k] - before[k]
        took = wait(lambda: c.view(node)["state"] == "direct", STATE_TIMEOUT_S, f"{node} back to direct")
        print(f"  {node} storage link up: direct again after {took:.1f} s")
    want = sum(case.count * parse_size(case.size) for case in cases) * repeat
    print(f"  {node} redirected counters grew by {grew['redirected_requests']} requests, "
          f"{format_size(grew['redirected_bytes'])} (the benchmark moved {format_size(want)})")
    if grew["redirected_requests"] <= 0 or grew["redirected_bytes"] < want:
        raise Broken(f"{node}'s redirected counters did not grow as the redirected passes require: {grew}")
    print(f"  {'case':22} {'direct s':>10} {'redirected s':>12} {'ratio':>7}")
    for case in cases:
        d, r = min(direct[case.name]), min(redirected[case.name])
        print(f"  {case.name:22} {d:10.3f} {r:12.3f} {d / r:6.2f}x  "
              f"({case.count} ops)  {verdict(d / r >= GOAL_REDIRECT_RATIO)} (>= {GOAL_REDIRECT_RATIO}x)")
    for case in cases:  # every round, to show how much the machine moved them
        print(f"  {case.name}, every round: direct " + " ".join(f"{t:.3f}" for t in direct[case.name])
              + " s; redirected " + " ".join(f"{t:.3f}" for t in redirected[case.name]) + " s")


# -- 3. allocation round trip -------------------------------------------------------


def allocation_latency(c: Cluster, node: str, count: int, repeat: int) -> None:
    runs = []
    for i in range(repeat):
        path = f"/alloc{i}.raw"  # a fresh sparse file each run: every probe allocates
        c.file(node, "create", path=path, size=max(256 * MiB, count * MiB * 2))
        runs.append(c.req(node, "volume_probe_alloc", timeout_s=120, volume=VOLUME, file=path, count=count))
    best = min(runs, key=lambda r: r["p50_ms"])
    print(f"  {count} allocations from {node} (coordinator {best['coordinator']}): "
          f"p50 {best['p50_ms']:.3f} ms, p90 {best['p90_ms']:.3f} ms, max {best['max_ms']:.3f} ms  "
          f"{verdict(best['p50_ms'] <= GOAL_ALLOC_P50_MS)} (p50 <= {GOAL_ALLOC_P50_MS:g} ms)")
    if repeat > 1:
        print("  p50 of every run: " + ", ".join(f"{r['p50_ms']:.3f} ms" for r in runs))


# -- 4. coordinator move under load -------------------------------------------------


def start_writer(c: Cluster, node: str, path: str, seed: int) -> tuple[subprocess.Popen[str], Path]:
    stop = Path(c.st.dir) / f"bench-stop-{node}"
    stop.unlink(missing_ok=True)
    sock = c.req(node, "nbd_path", volume=VOLUME, file=path)["socket"]
    cmd = [sys.executable, "-m", "shoal.lab.writer", "--socket", sock, "--export", path.strip("/"),
           "--seconds", "600", "--seed", str(seed), "--stop-file", str(stop), "--slow-ms", str(SLOW_MS)]
    proc = subprocess.Popen(c.in_ns(node, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c.procs.append(proc)
    return proc, stop


def writer_result(node: str, proc: subprocess.Popen[str], stop: Path) -> dict[str, Any]:
    stop.touch()
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise Broken(f"the writer on {node} printed no result (exit {proc.returncode}): {out}{err}")
    return dict(json.loads(lines[-1]))


#: the probe behind MachineStalls: at real-time priority (so that CPU load cannot
#: delay it; only a machine that stops running everything can), it sleeps 1 ms at a
#: time until its stdin closes, then prints the late wake-ups as JSON
_STALL_PROBE = """
import json, os, select, sys, time
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
slow_ms, stalls, last = float(sys.argv[1]), [], time.monotonic()
while not select.select([sys.stdin], [], [], 0.001)[0]:
    now = time.monotonic()
    late_ms = (now - last) * 1000 - 1
    if late_ms > slow_ms:
        stalls.append((time.time() - (now - last), late_ms))
    last = now
print(json.dumps(stalls))
"""


class MachineStalls:
    """Moments when the whole machine stalled (the host did not run this VM), whatever
    the cluster was doing: seen by a real-time process that sleeps 1 ms at a time and
    records when it woke more than ``SLOW_MS`` late."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (began, Unix s; length, ms)
        self._proc = subprocess.Popen([sys.executable, "-c", _STALL_PROBE, str(SLOW_MS)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> MachineStalls:
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("", timeout=30)
        if self._proc.returncode != 0:
            raise Broken(f"the machine-stall probe failed ({self._proc.returncode})")
        self.stalls = [(float(at), float(ms)) for at, ms in json.loads(out)]

    def overlapping(self, began: float, ms: float) -> float:
        """The longest machine stall within [began, began + ms]; 0 if none."""
        end = began + ms / 1000
        return max((s_ms for at, s_ms in self.stalls if at < end and at + s_ms / 1000 > began), default=0.0)


def move_under_load(c: Cluster, moves: int, settle_s: float) -> None:
    with MachineStalls() as machine:
        _move_under_load(c, moves, settle_s, machine)


def _move_under_load(c: Cluster, moves: int, settle_s: float, machine: MachineStalls) -> None:
    writers = {}
    for i, node in enumerate(c.st.nodes):
        c.file(node, "create", path=f"/move{i}.raw", size=64 * MiB)
        writers[node] = start_writer(c, node, f"/move{i}.raw", seed=4000 + i)
    try:
        time.sleep(settle_s)
        for node, (proc, _) in writers.items():
            if proc.poll() is not None:
                raise Broken(f"the writer on {node} exited early: {proc.communicate()}")
        paused = []
        windows: list[tuple[float, float]] = []  # each move: from the request to its answer
        for _ in range(moves):
            coord = c.coordinator()
            if coord is None:
                raise Broken("the volume has no coordinator before a move")
            nodes = c.st.nodes
            target = nodes[(nodes.index(coord) + 1) % len(nodes)]  # round the ring: every node once
            began = time.time()
            r = c.move(target)
            windows.append((began, time.time()))
            wait(coordinator_is(c, target), STATE_TIMEOUT_S, f"{target} is coordinator")
            paused.append(float(r["paused_ms"]))
            print(f"  move {coord} -> {target}: paused {r['paused_ms']:.1f} ms "
                  f"(quiesce {r.get('quiesce_ms')} ms, close {r.get('close_ms')} ms, "
                  f"target opened the volume in {r.get('target_ms')} ms, replaying {r.get('replayed')} "
                  "journal records)")
            time.sleep(settle_s)
    finally:
        results = {node: writer_result(node, proc, stop) for node, (proc, stop) in writers.items()}
    for node, r in results.items():
        print(f"  writer on {node}: {r.get('writes', 0)} writes, {r.get('reads', 0)} reads, "
              f"p50 {r.get('p50_latency_ms')} ms, max {r.get('max_latency_ms')} ms, "
              f"{r.get('errors')} errors, {r.get('mismatches')} mismatches")
    bad = {n: r for n, r in results.items()
           if "fatal" in r or r["errors"] or r["mismatches"] or not r["writes"]}
    if bad:
        raise Broken(f"writers saw errors or lost acknowledged writes: {bad}")
    worst_pause = max(paused)
    print(f"  worst move pause {worst_pause:.1f} ms  {verdict(worst_pause <= GOAL_MOVE_MS)} "
          f"(<= {GOAL_MOVE_MS:g} ms)")
    # a request stalled by a move was in flight during it; any other slow request is
    # this machine's load (reported too, for comparison)
    during: list[tuple[float, str, str]] = []  # (ms, node, what)
    other: list[tuple[float, str]] = []
    for n, r in results.items():
        for at, ms, kind in r.get("slow", []):
            move = next((i for i, (began, end) in enumerate(windows)
                         if at < end + MOVE_AFTERMATH_S and at + ms / 1000 > began), None)
            if move is None:
                other.append((float(ms), n))
                continue
            began, end = windows[move]
            what = (f"a {kind} sent {(at - began) * 1000:+.0f} ms from the start of move {move + 1} "
                    f"(answered after {(end - began) * 1000:.0f} ms)")
            frozen = machine.overlapping(at, ms)
            if frozen:
                what += f"; the whole machine stalled {frozen:.0f} ms meanwhile"
            during.append((float(ms), n, what))
    stalls = sorted(ms for _, ms in machine.stalls)
    print(f"  the whole machine stalled (a real-time 1 ms timer woke over {SLOW_MS:g} ms late) "
          f"{len(stalls)} times, longest {stalls[-1] if stalls else 0:.0f} ms")
    stall, stall_node, what = max(during, default=(0.0, "-", "none"))
    print(f"  longest request in flight during a move {stall:.1f} ms (writer on {stall_node}: {what})")
    # the goal is about what a move costs: a request the machine itself froze cannot show it
    clean = [d for d in during if "whole machine" not in d[2]]
    stall, stall_node, what = max(clean, default=(0.0, "-", "none"))
    print(f"  ... while the machine ran {stall:.1f} ms (writer on {stall_node}: {what})  "
          f"{verdict(stall <= GOAL_MOVE_MS)} (<= {GOAL_MOVE_MS:g} ms)")
    calm, calm_node = max(other, default=(0.0, "-"))
    print(f"  longest request at any other time {calm:.1f} ms (writer on {calm_node}); requests over "
          f"{SLOW_MS:g} ms: {len(during)} during moves, {len(other)} at other times")


# -- main ---------------------------------------------------------------------------


def log_summary(logs: Path, show: int = 3) -> None:
    """What the agents complained about during the run (their logs go with the lab)."""
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", ln)]
        warn = sum(1 for ln in lines if re.search(r"\bWARNING\b", ln))
        print(f"  {log.name}: {len(lines)} lines, {warn} warnings, {len(bad)} errors")
        for ln in bad[:show]:
            print(f"    {ln[:200]}")


def run(c: Cluster, args: argparse.Namespace, size: int) -> None:
    st = c.st
    wait(lambda: all_direct(c), STATE_TIMEOUT_S, "a coordinator and every node direct")
    node = st.nodes[1]
    coord = c.coordinator()
    if coord == node:
        target = next(n for n in st.nodes if n != node)
        c.move(target)
        wait(coordinator_is(c, target), STATE_TIMEOUT_S, f"{target} is coordinator")
        coord = target
    print(f"lab {st.dir}: nodes {', '.join(st.nodes)}, coordinator {coord}, I/O from {node}")
    cases = io_cases(args.quick, size)

    parts = set(args.only or ["direct", "redirected", "alloc", "move"])
    if parts & {"direct", "redirected"}:
        print(f"\n1. direct I/O through {node}'s agent vs qemu-nbd (ratio = qemu-nbd time / shoal time)")
        direct_vs_qemu_nbd(c, node, size, cases if "direct" in parts else cases[:1], args.repeat)
    if "redirected" in parts:
        print(f"\n2. redirected vs direct from {node} (ratio = direct time / redirected time)")
        redirected_vs_direct(c, node, cases[:2], args.repeat)
        wait(lambda: all_direct(c), STATE_TIMEOUT_S, "every node direct")
    if "alloc" in parts:
        print(f"\n3. allocation round trip from {node} to the coordinator")
        allocation_latency(c, node, 50 if args.quick else 200, args.repeat)
    if "move" in parts:
        print("\n4. coordinator move while a writer runs on every node")
        move_under_load(c, 3, 2.0 if args.quick else 3.0)


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (as /proc/mounts says), or "?"."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and (resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def ram_dir(need: int) -> str | None:
    """/dev/shm when it is a tmpfs with ``need`` bytes free; else None (the default)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and filesystem(shm) == "tmpfs" and shutil.disk_usage(shm).free >= need:
        return str(shm)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timed measure; the best counts (default 3)")
    parser.add_argument("--size", default="1G", help="size of the benchmarked file (default 1G)")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--only", action="append", choices=["direct", "redirected", "alloc", "move"],
                        help="run only this measure (repeatable; default: all four)")
    parser.add_argument("--dir", type=Path, help="where the lab and the peer's image live "
                        "(default: /dev/shm if it is a tmpfs with room, else the system's temporary directory)")
    parser.add_argument("--logs", type=Path, help="copy the agents' and the target's logs here at the end")
    args = parser.parse_args()
    size = parse_size(args.size)
    if args.quick and size > 256 * MiB:
        size = 256 * MiB
    if size < 64 * MiB or size % MiB:
        raise SystemExit("--size must be a whole number of MiB, at least 64M")
    if os.geteuid() != 0:
        raise SystemExit("this benchmark builds a lab with network namespaces; run it as root")
    for tool in ("qemu-img", "qemu-nbd", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing; install qemu-utils and iproute2")
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(f"best of {args.repeat}, file {format_size(size)}, qemu-img bench -t none"
          + (", quick" if args.quick else ""))
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-csv-", dir=args.dir or ram_dir(6 * size)))
    print(f"lab in {work} ({filesystem(work)})")
    lab = Lab(work / "lab")
    t0 = time.monotonic()
    c: Cluster | None = None
    try:
        c = Cluster(lab, lab.up(3, name=LAB_NAME, say=lambda s: None))
        run(c, args, size)
        print("\nagent and target logs")
        log_summary(work / "lab" / "logs")
    except Exception as err:  # noqa: BLE001 - report, tear down, exit 1
        print(f"\nBROKEN: {err}", file=sys.stderr)
        print(f"the agents' logs were in {work / 'lab' / 'logs'}:", file=sys.stderr)
        for log in sorted((work / "lab" / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        for proc in c.procs if c else []:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        (work / "lab" / "bench-peer.raw").unlink(missing_ok=True)
        if args.logs is not None and (work / "lab" / "logs").is_dir():
            shutil.copytree(work / "lab" / "logs", args.logs, dirs_exist_ok=True)
            print(f"logs copied to {args.logs}")
        lab.down(LAB_NAME)
        shutil.rmtree(work, ignore_errors=True)
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
