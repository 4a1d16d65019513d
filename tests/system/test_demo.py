"""`shoal demo`, as the README's first command runs it: succeeds, narrates, cleans up."""

from __future__ import annotations

import subprocess
import sys

from tests.system.lab_helpers import require_lab_tools


def test_demo_runs_and_leaves_nothing_behind() -> None:
    require_lab_tools()
    proc = subprocess.run([sys.executable, "-m", "shoal", "demo"], capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "sha256 identical: True" in out
    assert "1000 (auto)" in out and "10000 (auto)" in out and "1100 (auto)" in out
    assert "internal traffic now on: migration" in out and "node2 is up" in out
    assert "internal traffic back on: cluster" in out
    assert "lab removed" in out
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "shoal-demo" not in left
