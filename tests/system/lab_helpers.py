"""Shared helpers of the lab system tests: build a lab, query agents, always tear down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shoal.agent.control import request
from shoal.lab.lab import Lab, LabState


def require_lab_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root for network namespaces; run the suite as root (./run test)")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package {pkg} (./run setup does it)")
    probe = f"shoal-probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if res.returncode != 0:
        pytest.fail(f"cannot create network namespaces here ({res.stderr.strip()}); the lab needs them")


def shoal(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def shoal_ok(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    p = shoal(*args, env=env, timeout=timeout)
    assert p.returncode == 0, f"shoal {' '.join(args)} exited {p.returncode}: {p.stderr}{p.stdout}"
    assert "Traceback" not in p.stderr
    return p.stdout


@contextmanager
def running_lab(tmp_path: Path, nodes: int, *, loopback: bool = False,
                timing: str = "default") -> Iterator[tuple[Lab, LabState]]:
    require_lab_tools()
    name = f"t{os.getpid() % 100000}n{nodes}"
    lab = Lab(tmp_path / "lab")
    try:
        st = lab.up(nodes, name=name, loopback=loopback, timing=timing, say=lambda s: None)
        yield lab, st
    finally:
        lab.down(name)


def status(st: LabState, node: str) -> dict[str, Any]:
    return request(Path(st.dir) / "run" / f"{node}.sock", "status", timeout_s=5)


def events(st: LabState, node: str) -> list[dict[str, Any]]:
    return request(Path(st.dir) / "run" / f"{node}.sock", "events", timeout_s=5)


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Poll ``cond`` until true; returns the seconds it took. Bounded in time."""
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not true within {timeout_s} s")
        time.sleep(poll_s)


def all_up(st: LabState) -> bool:
    for node in st.nodes:
        v = status(st, node)
        if any(info["state"] != "up" for info in v["nodes"].values()):
            return False
        if any(link["state"] != "up" for n, info in v["nodes"].items() if n != node
               for link in info["links"].values()):
            return False
    return True


def down_events(st: LabState, nodes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every node or link that went from up to down, as any agent saw it."""
    out = []
    for node in nodes or st.nodes:
        for e in events(st, node):
            if e["kind"] in ("node", "link") and e["old"] == "up" and e["new"] == "down":
                out.append({"seen_by": node, **e})
    return out


def leftovers(name: str, directory: Path) -> list[str]:
    found = []
    netns = Path("/run/netns")
    if netns.exists():
        found += [f"namespace {p.name}" for p in netns.iterdir() if p.name.startswith(f"shoal-{name}-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    found += [f"link {ln.split()[0]}" for ln in links.splitlines() if f"shoal-{name}" in ln]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(directory / "cluster.toml").encode() in argv or str(directory / "lun0.img").encode() in argv:
                found.append(f"process {entry.name}")
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {ln.split()[1]}" for ln in mounts.splitlines() if str(directory) in ln.split()[1]]
    if directory.exists():
        found.append(f"directory {directory}")
    return found


def first_event_after(st: LabState, seen_by: str, t0_mono: float, **match: Any) -> float:
    """Seconds from ``t0_mono`` (this host's monotonic clock, which the agents share)
    to the first event recorded by agent ``seen_by`` matching every ``match`` field."""
    for e in events(st, seen_by):
        if e["mono"] >= t0_mono and all(e.get(k) == v for k, v in match.items()):
            return float(e["mono"] - t0_mono)
    raise AssertionError(f"{seen_by} recorded no event {match} after the fault")
