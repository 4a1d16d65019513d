"""Done-when 6 (test-suite length): 16 agents on this machine, 60 s, zero false downs.

bench/bench_agents.py runs the full 5 minutes and tries 64 agents."""

from __future__ import annotations

import time
from pathlib import Path

from tests.system.lab_helpers import all_up, down_events, running_lab, wait_for

RUN_S = 60


def test_sixteen_agents_no_false_down(tmp_path: Path) -> None:
    with running_lab(tmp_path, 16) as (lab, st):
        took = wait_for(lambda: all_up(st), 60, "all 16×15×3 links up", poll_s=0.5)
        print(f"16 agents: every link up {took:.1f} s after start")
        since = time.time()
        time.sleep(RUN_S)
        assert all_up(st)
        downs = [e for e in down_events(st) if e["t"] >= since]
        assert downs == [], downs[:5]
