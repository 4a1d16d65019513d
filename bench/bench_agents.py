"""How many node agents one machine holds: CPU per agent and false downs.

    python bench/bench_agents.py                   # 16 then 64 agents, 5 minutes each
    python bench/bench_agents.py --nodes 16 --seconds 60 --loopback

For each size: build a lab (namespaces as root, loopback otherwise), wait until
every link is up, then run for ``--seconds`` with default timing (1 s × 5) and
report the CPU each agent used (agent plus its heartbeat process, % of one
core), the worst heartbeat age seen, and every up→down event (any is false:
nothing was broken). A size is *stable* when there were none. Always tears
the lab down. Bounded: one lab at a time, fixed duration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal.agent.control import request
from shoal.lab.lab import Lab, LabState

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_by_group(pgids: set[int]) -> dict[int, float]:
    """CPU seconds (user+system) of every process, summed per process group."""
    out = dict.fromkeys(pgids, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        pgrp = int(fields[2])
        if pgrp in out:
            out[pgrp] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def views(st: LabState) -> dict[str, Any]:
    return {n: request(Path(st.dir) / "run" / f"{n}.sock", "status", timeout_s=10) for n in st.nodes}


def links_up(v: dict[str, Any]) -> tuple[int, int]:
    up = total = 0
    for node, view in v.items():
        for peer, info in view["nodes"].items():
            if peer == node:
                continue
            for link in info["links"].values():
                total += 1
                up += link["state"] == "up"
    return up, total


def down_events(st: LabState, since: float) -> list[dict[str, Any]]:
    out = []
    for n in st.nodes:
        for e in request(Path(st.dir) / "run" / f"{n}.sock", "events", timeout_s=10, since=since):
            if e["kind"] in ("node", "link") and e["old"] == "up" and e["new"] == "down":
                out.append({"seen_by": n, **e})
    return out


def run_size(n: int, seconds: float, loopback: bool) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix=f"shoal-bench{n}-"))
    lab = Lab(d / "lab")
    name = f"b{os.getpid() % 10000}n{n}"
    result: dict[str, Any] = {"nodes": n}
    try:
        t0 = time.monotonic()
        st = lab.up(n, name=name, loopback=loopback or None, say=lambda s: print(s, file=sys.stderr))
        result["mode"] = st.mode
        deadline = time.monotonic() + 60 + 2 * n
        while True:
            up, total = links_up(views(st))
            if up == total:
                break
            if time.monotonic() > deadline:
                result["error"] = f"only {up} of {total} links came up"
                return result
            time.sleep(1)
        result["start_s"] = round(time.monotonic() - t0, 1)
        pgids = set(st.agents.values())
        c0, w0, since = cpu_by_group(pgids), time.monotonic(), time.time()
        worst_age = 0.0
        end = w0 + seconds
        while time.monotonic() < end:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            v = views(st)
            for _node, view in v.items():
                for _peer, info in view["nodes"].items():
                    for link in info["links"].values():
                        if link["last_seen_s"] is not None:
                            worst_age = max(worst_age, link["last_seen_s"])
            up, total = links_up(v)
            print(f"  {n} agents, {time.monotonic() - w0:.0f}/{seconds:.0f} s: {up}/{total} links up, "
                  f"worst heartbeat age {worst_age:.2f} s", file=sys.stderr)
        c1, wall = cpu_by_group(pgids), time.monotonic() - w0
        per_agent = [100 * (c1[g] - c0[g]) / wall for g in pgids]
        downs = down_events(st, since)
        result.update({
            "seconds": round(wall, 1),
            "cpu_per_agent_pct_mean": round(sum(per_agent) / len(per_agent), 2),
            "cpu_per_agent_pct_max": round(max(per_agent), 2),
            "cpu_total_pct": round(sum(per_agent), 1),
            "worst_heartbeat_age_s": round(worst_age, 2),
            "false_down_events": len(downs),
            "stable": not downs,
            "first_downs": downs[:5],
        })
        return result
    except Exception as err:
        result["error"] = str(err)
        return result
    finally:
        lab.down(name)
        try:
            d.rmdir()
        except OSError:
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--loopback", action="store_true", help="loopback addresses even as root")
    args = p.parse_args()
    results = []
    for n in args.nodes:
        print(f"== {n} agents, {args.seconds:g} s", file=sys.stderr)
        r = run_size(n, args.seconds, args.loopback)
        results.append(r)
        print(json.dumps(r))
    ok = all(r.get("stable") for r in results)
    for r in results:
        if "error" in r:
            print(f"{r['nodes']} agents: FAILED: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['nodes']} agents ({r['mode']}): {r['cpu_per_agent_pct_mean']}% of a core per agent "
                  f"(max {r['cpu_per_agent_pct_max']}%), {r['false_down_events']} false down events, "
                  f"worst heartbeat age {r['worst_heartbeat_age_s']} s: "
                  f"{'stable' if r['stable'] else 'NOT stable'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
