"""Done-when 5: no false down while a node's CPU and data path are saturated for 60 s.

Load on node1: one busy loop per core, bulk TCP into node1 over the cluster
network (the network its heartbeats and internal traffic use) and over public,
and fsync'ed disk writes. Default timing (1 s × 5)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shoal.lab.lab import Lab
from tests.system.lab_helpers import all_up, down_events, running_lab, status, wait_for

LOAD_S = 60


def test_no_false_down_under_cpu_and_io_saturation(tmp_path: Path) -> None:
    with running_lab(tmp_path, 3) as (lab, st):
        wait_for(lambda: all_up(st), 20, "all links up before the load")
        since = time.time()
        procs = []

        def in_ns(node: str, *args: str) -> None:
            cmd = ["ip", "netns", "exec", st.ns(node), sys.executable, "-m", "shoal.lab.load", *args]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

        in_ns("node1", "sink", "198.18.1.1", "5001", str(LOAD_S + 2))
        in_ns("node1", "sink", "198.18.2.1", "5002", str(LOAD_S + 2))
        time.sleep(0.5)
        for _ in range(os.cpu_count() or 2):
            in_ns("node1", "cpu", str(LOAD_S))
        in_ns("node2", "send", "198.18.1.1", "5001", str(LOAD_S))
        in_ns("node3", "send", "198.18.2.1", "5002", str(LOAD_S))
        in_ns("node1", "disk", str(Path(st.dir) / "load.bin"), str(LOAD_S))
        worst_age = 0.0
        try:
            end = time.monotonic() + LOAD_S
            while time.monotonic() < end:
                for node in ("node1", "node2"):
                    view = status(st, node)
                    for _peer, info in view["nodes"].items():
                        for link in info["links"].values():
                            if link["last_seen_s"] is not None:
                                worst_age = max(worst_age, link["last_seen_s"])
                time.sleep(1)
        finally:
            outputs = []
            for p in procs:
                try:
                    outputs.append(p.communicate(timeout=15)[0])
                except subprocess.TimeoutExpired:
                    p.kill()
        sent = [o for o in outputs if o and o.startswith("sent")]
        print(f"bulk: {sent}; worst heartbeat age seen: {worst_age:.2f} s")
        assert sent and all(int(o.split()[1]) > 100 for o in sent), "the bulk transfer did not run"
        downs = [e for e in down_events(st) if e["t"] >= since]
        assert downs == [], downs
        assert worst_age < 5.0
        assert isinstance(lab, Lab)
