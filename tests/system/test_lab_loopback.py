"""The lab without namespaces (what a non-root user gets): loopback addresses and
in-process link faults, with the fast timing profile (0.2 s × 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.system.lab_helpers import all_up, running_lab, shoal_ok, status, wait_for


def test_loopback_lab_routes_and_in_process_fault(tmp_path: Path) -> None:
    with running_lab(tmp_path, 3, loopback=True, timing="fast") as (lab, st):
        assert st.mode == "loopback" and not Path("/run/netns", st.ns("node1")).exists()
        wait_for(lambda: all_up(st), 10, "all links up")
        cfg = Path(st.config).read_text()
        assert "198.18." not in cfg and '"127.' in cfg
        lab.set_link("node2", "cluster", up=False)
        took = wait_for(lambda: status(st, "node1")["routes"]["node2"]["internal"] == "migration", 2,
                        "internal traffic node1<->node2 on migration")
        assert took < 1.0 + 0.5  # 0.2 s × 5 plus polling
        assert json.loads(shoal_ok("lab", "status", "--dir", st.dir, "--json"))["nodes"]["node2"]["links"][
            "cluster"] == "down"
        out = shoal_ok("lab", "exec", "--dir", st.dir, "node3", "--", sys.executable, "-m", "shoal", "node", "ls")
        assert "as seen from node3" in out
        lab.set_link("node2", "cluster", up=True)
        wait_for(lambda: status(st, "node1")["routes"]["node2"]["internal"] == "cluster", 3, "back on cluster")
        assert all(v["state"] == "up" for v in status(st, "node1")["nodes"].values())
