"""Coordinator election between real processes sharing one volume file.

Each contender process renews its liveness slot and, while coordinator, appends
``epoch node t`` to a shared history (t: CLOCK_MONOTONIC, which all processes on this
machine share, so the test can compare instants; shoal itself never compares clocks).
The history must show epochs that increase with time and never overlap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shoal.volume import format_volume
from shoal.volume.device import Device
from shoal.volume.lease import LeaseArea
from shoal.volume.volume import read_superblock

IO_TIMEOUT_S = 0.2  # expiry 8T = 1.6 s keeps the test short

_CONTENDER = """
import os, sys, time
from shoal.coordinator.election import Election, LivenessRenewer
from shoal.coordinator.errors import LeaseLost
from shoal.volume.device import Device
from shoal.volume.lease import LeaseArea, LeaseTiming
from shoal.volume.volume import read_superblock
path, node, history = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dev = Device(path)
sb, _ = read_superblock(dev)
area = LeaseArea(dev, sb)
timing = LeaseTiming(float(sys.argv[4]))
renewer = LivenessRenewer(area, node, cluster="test", timing=timing)
renewer.start()
election = Election(area, renewer, cluster="test")
fd = os.open(history, os.O_WRONLY | os.O_APPEND)
while True:
    if not election.acquire(deadline_s=1.0):
        continue
    while True:
        t = time.monotonic()
        try:
            election.guard()
        except LeaseLost:
            break
        os.write(fd, f"{election.epoch} {node} {t:.6f}\\n".encode())
        time.sleep(0.02)
"""


def _start(vol: str, node: int, history: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _CONTENDER, vol, str(node), history, str(IO_TIMEOUT_S)])


def _history(path: str) -> list[tuple[int, int, float]]:
    out = []
    for line in Path(path).read_text().splitlines():
        e, n, t = line.split()
        out.append((int(e), int(n), float(t)))
    return out


def _holder(vol: str) -> tuple[int, int]:
    with Device(vol, writable=False) as dev:
        sb, _ = read_superblock(dev)
        lease = LeaseArea(dev, sb).read_lease()
        return lease.owner, lease.epoch


def _wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _check_no_overlap(hist: list[tuple[int, int, float]]) -> None:
    spans: dict[int, tuple[int, float, float]] = {}
    for epoch, node, t in hist:
        if epoch in spans:
            n0, a, b = spans[epoch]
            assert n0 == node, f"two nodes wrote with epoch {epoch}"
            spans[epoch] = (n0, min(a, t), max(b, t))
        else:
            spans[epoch] = (node, t, t)
    ordered = sorted(spans.items())
    for (e1, (_, _, end1)), (e2, (_, start2, _)) in zip(ordered, ordered[1:], strict=False):
        assert end1 < start2, f"epoch {e1} still wrote at {end1:.3f} after epoch {e2} began at {start2:.3f}"


def test_one_coordinator_through_kill_and_freeze(tmp_path: Path) -> None:
    vol = str(tmp_path / "vol.img")
    format_volume(vol, 64 << 20)
    history = str(tmp_path / "history")
    Path(history).touch()
    procs = {n: _start(vol, n, history) for n in (1, 2, 3)}
    try:
        first, epoch1 = _wait_for(lambda: _holder(vol) if _holder(vol)[0] and _history(history) else None, 30, "a coordinator")
        # SIGKILL the coordinator: another node takes over only after the lease rules allow
        killed_at = time.monotonic()
        procs[first].kill()
        procs[first].wait()
        second, epoch2 = _wait_for(lambda: _holder(vol) if _holder(vol)[0] not in (0, first) else None, 30, "a takeover")
        assert epoch2 > epoch1
        took = _wait_for(lambda: min((t for e, _, t in _history(history) if e == epoch2), default=None), 30,
                         "the new coordinator's first write")
        assert took - killed_at >= 8 * IO_TIMEOUT_S * 0.5, "took over before the old holder's slot could expire"
        # freeze the new coordinator past its lease, then thaw it: it must stop by itself
        os.kill(procs[second].pid, signal.SIGSTOP)
        third, epoch3 = _wait_for(lambda: _holder(vol) if _holder(vol)[0] not in (0, first, second) else None, 30, "a takeover from the frozen node")
        os.kill(procs[second].pid, signal.SIGCONT)
        time.sleep(1.0)
        assert epoch3 > epoch2
        assert _holder(vol) == (third, epoch3), "the thawed node must not take the lease back"
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    hist = _history(history)
    assert {e for e, _, _ in hist} >= {epoch1, epoch2, epoch3}
    _check_no_overlap(hist)
