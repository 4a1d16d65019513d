"""VMs on the shared volume in a 3-node lab: live migration around the cluster on the
chosen network, a Linux guest verifying its disk through migration and a storage cut,
convergence, failures mid-migration, quick migration, failover after a kill and a
freeze (never two instances), and drain.

One lab for the module (default timing, T = 1 s). VMs run under TCG unless the agents'
probe proved KVM. Each test leaves every node running and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.agent.control import request
from shoal.lab.lab import Lab, LabState
from shoal.vm.qemu import find_vm_processes
from tests.system import csv_helpers as h
from tests.system.lab_helpers import running_lab, shoal, shoal_ok, wait_for

pytestmark = [pytest.mark.timeout(900), pytest.mark.qemu]

T = 1.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, LabState]]:
    from shoal.vm.guests.paths import locate

    try:
        locate("memory")
        locate("disk")
    except Exception as err:  # noqa: BLE001 - say what to do
        pytest.fail(f"{err}")
    with running_lab(tmp_path_factory.mktemp("vm"), 3) as (lab, st):
        wait_for(lambda: h.coordinator(st) is not None and all(
            v["state"] == "direct" for v in h.volume_ls(st, "node1")["nodes"].values()), 60,
            "a coordinator and every node direct")
        yield lab, st


def env(st: LabState, node: str) -> dict[str, str]:
    return {"SHOAL_CONFIG": str(st.config), "SHOAL_NODE": node}


def vm(st: LabState, node: str, *args: str, timeout: float = 300) -> str:
    return shoal_ok("vm", *args, env=env(st, node), timeout=timeout)


def vm_json(st: LabState, node: str, *args: str, timeout: float = 300) -> Any:
    return json.loads(vm(st, node, *args, "--json", timeout=timeout))


def ctl(st: LabState, node: str, op: str, timeout: float = 300, **kw: Any) -> Any:
    return request(h.sock(st, node), op, timeout_s=timeout, **kw)


def vms(st: LabState, via: str = "node1") -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in ctl(st, via, "vm_ls", timeout=30)["vms"]}


def owner(st: LabState, name: str, via: str = "node1") -> str | None:
    return vms(st, via).get(name, {}).get("owner")


def running_on(st: LabState, name: str, node: str, via: str = "node1") -> bool:
    v = vms(st, via).get(name, {})
    return v.get("owner") == node and v.get("state") == "running"


def verify(st: LabState, name: str, via: str = "node1") -> dict[str, Any]:
    """The test guest's check passes (a guest that just started gets time to boot)."""
    deadline = time.monotonic() + 60
    while True:
        out = ctl(st, via, "vm_verify", name=name, timeout=120)
        if out["ok"] or "not finished booting" not in out["verdict"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out["ok"], f"{name}: {out}"
    return dict(out)


def dirtying(st: LabState, name: str) -> None:
    """Wait until the memory guest finished a pass: every page holds data from then on."""
    wait_for(lambda: "pass=" in ctl(st, "node1", "vm_console", name=name)["text"], 60,
             f"{name} dirties its memory")


def create(st: LabState, name: str, *args: str, on: str = "node1") -> None:
    vm(st, "node1", "create", name, *args)
    vm(st, "node1", "start", name, "--on", on)
    wait_for(lambda: running_on(st, name, on), 60, f"{name} running on {on}")


def remove(st: LabState, name: str) -> None:
    vm(st, "node1", "kill", name)
    vm(st, "node1", "delete", name)


class InstanceWatch:
    """Samples every lab host's processes: how many QEMUs of a VM run at once (a frozen
    process, state T, runs nothing)."""

    def __init__(self, name: str):
        self.name = name
        self.samples: list[tuple[float, list[tuple[int, str]]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            procs = []
            for pid in find_vm_processes(self.name):
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                procs.append((pid, state))
            self.samples.append((time.monotonic(), procs))

    def __enter__(self) -> InstanceWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)

    def most_running(self, grace_after: float | None = None, grace_s: float = 0.0) -> int:
        """The most non-frozen instances seen in one sample (a thawed stale copy may be
        seen during ``grace_s`` after ``grace_after``: it must be gone by then)."""
        worst = 0
        for t, procs in self.samples:
            if grace_after is not None and grace_after <= t <= grace_after + grace_s:
                continue
            worst = max(worst, sum(1 for _, s in procs if s != "T"))
        return worst


# ---- 1. live migration around the cluster ---------------------------------------------------

def test_tiny_guest_live_migrates_around_the_cluster(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    create(st, "mem1", "--memory", "64M", "--test-guest", "memory", "--dirty-rate", "8",
           "--disk", "vol1:/vms/mem1.raw,size=1M")
    time.sleep(1)
    for src, dst in (("node1", "node2"), ("node2", "node3"), ("node3", "node1")):
        out = vm_json(st, "node1", "migrate", "mem1", "--to", dst)
        assert (out["from"], out["to"], out["network"]) == (src, dst, "migration"), out
        assert out["downtime_ms"] is not None and out["downtime_ms"] < 5000, out
        assert running_on(st, "mem1", dst)
        v = verify(st, "mem1")
        assert not v["restarted"], v
    out = vm_json(st, "node3", "migrate", "mem1", "--to", "node2", "--network", "public")
    assert out["network"] == "public", out
    verify(st, "mem1")
    labo.set_link("node3", "migration", False)
    try:
        wait_for(lambda: h.request_status(st, "node2")["nodes"]["node3"]["links"]["migration"]["state"] == "down",
                 30, "node2 sees the migration link to node3 down")
        p = shoal("vm", "migrate", "mem1", "--to", "node3", "--network", "migration", env=env(st, "node1"),
                  timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert "down between node2 and node3" in p.stderr and "does not fall back" in p.stderr, p.stderr
        assert running_on(st, "mem1", "node2")
    finally:
        labo.set_link("node3", "migration", True)
    remove(st, "mem1")
    # the VM's own list of networks
    create(st, "mem2", "--memory", "64M", "--test-guest", "memory", "--disk", "vol1:/vms/mem2.raw,size=1M",
           "--migration-networks", "public")
    out = vm_json(st, "node1", "migrate", "mem2", "--to", "node3")
    assert out["network"] == "public", out
    verify(st, "mem2")
    remove(st, "mem2")


# ---- 2. the Linux guest verifies its disk through migration and a storage cut -----------------

def _disk_rounds(st: LabState, name: str) -> int:
    return int(ctl(st, "node1", "vm_verify", name=name, timeout=60)["rounds"])


def test_linux_guest_verifies_its_disk_through_migration_and_storage_loss(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    create(st, "lin1", "--memory", "128M", "--test-guest", "disk", "--disk", "vol1:/vms/lin1.raw,size=8M")
    wait_for(lambda: _disk_rounds(st, "lin1") >= 2, 180, "the Linux guest verified two rounds")
    out = vm_json(st, "node1", "migrate", "lin1", "--to", "node2")
    assert out["network"] == "migration"
    r0 = _disk_rounds(st, "lin1")
    labo.set_link("node2", "storage", False)
    try:
        wait_for(lambda: h.node_view(st, "node2")["state"] == "redirected", 30, "node2 redirected")
        wait_for(lambda: _disk_rounds(st, "lin1") >= r0 + 2, 180, "rounds while redirected")
    finally:
        labo.set_link("node2", "storage", True)
    wait_for(lambda: h.node_view(st, "node2")["state"] == "direct", 60, "node2 direct again")
    r1 = _disk_rounds(st, "lin1")
    wait_for(lambda: _disk_rounds(st, "lin1") >= r1 + 1, 120, "a round after the restore")
    v = verify(st, "lin1")
    assert v["errors"] == 0 and v["restarts_since_arrival"] == 0, v
    remove(st, "lin1")


# ---- 3. convergence ------------------------------------------------------------------------

def test_a_guest_dirtying_faster_than_the_cap_converges_or_aborts_cleanly(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    create(st, "busy1", "--memory", "256M", "--test-guest", "memory", "--dirty-rate", "0",
           "--disk", "vol1:/vms/busy1.raw,size=1M")
    dirtying(st, "busy1")
    p = shoal("vm", "migrate", "busy1", "--to", "node2", "--bandwidth", "16", "--json",
              env=env(st, "node1"), timeout=900)
    assert "Traceback" not in p.stderr, p.stderr
    if p.returncode == 0:
        out = json.loads(p.stdout)
        assert out["policy"], f"it converged without the policy acting at 16 MiB/s: {out}"
        assert running_on(st, "busy1", "node2")
    else:
        assert "converge" in p.stderr or "abort" in p.stderr, p.stderr
        assert running_on(st, "busy1", "node1"), "an aborted migration must leave the VM on the source"
    verify(st, "busy1")
    remove(st, "busy1")


# ---- 4. failures mid-migration ----------------------------------------------------------------

def _migrate_in_background(st: LabState, name: str, to: str, *extra: str) -> Any:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "shoal", "vm", "migrate", name, "--to", to, *extra],
                            env={**os.environ, **env(st, "node1")}, stdout=-1, stderr=-1, text=True)


def test_destination_killed_or_network_cut_mid_migration_leaves_the_vm_on_the_source(
        lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    create(st, "mem3", "--memory", "128M", "--test-guest", "memory", "--dirty-rate", "64",
           "--disk", "vol1:/vms/mem3.raw,size=1M")
    dirtying(st, "mem3")
    # the destination's QEMU dies while memory is copied (a low cap makes it last)
    proc = _migrate_in_background(st, "mem3", "node2", "--bandwidth", "8")
    wait_for(lambda: len(find_vm_processes("mem3")) == 2, 60, "the destination QEMU started")
    time.sleep(2)
    # the destination is the QEMU waiting with -incoming (pids may wrap: not "the newest")
    incoming = [pid for pid in find_vm_processes("mem3")
                if b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    assert len(incoming) == 1, find_vm_processes("mem3")
    os.kill(incoming[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "keeps running on node1" in err, err
    assert running_on(st, "mem3", "node1")
    verify(st, "mem3")
    # the migration network goes down while memory is copied
    proc = _migrate_in_background(st, "mem3", "node2", "--bandwidth", "8")
    wait_for(lambda: len(find_vm_processes("mem3")) == 2, 60, "the destination QEMU started")
    time.sleep(2)
    labo.set_link("node2", "migration", False)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        labo.set_link("node2", "migration", True)
    assert proc.returncode != 0 and "keeps running on node1" in err, err
    assert running_on(st, "mem3", "node1")
    wait_for(lambda: len(find_vm_processes("mem3")) == 1, 60, "the destination QEMU gone")
    verify(st, "mem3")
    wait_for(lambda: h.request_status(st, "node1")["nodes"]["node2"]["links"]["migration"]["state"] == "up", 60,
             "the migration link up again")
    out = vm_json(st, "node1", "migrate", "mem3", "--to", "node2")
    assert out["to"] == "node2" and running_on(st, "mem3", "node2")
    verify(st, "mem3")
    # ---- 5. quick migration through the volume
    out = vm_json(st, "node1", "migrate", "mem3", "--to", "node3", "--quick")
    assert out["mode"] == "quick" and out["network"] is None, out
    assert running_on(st, "mem3", "node3")
    verify(st, "mem3")
    remove(st, "mem3")


# ---- 7. drain --------------------------------------------------------------------------------

def test_drain_moves_every_vm_at_most_two_at_a_time(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    names = ["dr1", "dr2", "dr3"]
    for n in names:
        create(st, n, "--memory", "64M", "--test-guest", "memory", "--disk", f"vol1:/vms/{n}.raw,size=1M")
    try:
        out = json.loads(shoal_ok("node", "drain", "node1", "--json", env=env(st, "node2"), timeout=600))
        assert not out["left"], out
        spans = []
        for r in out["results"]:
            assert r["to"] in ("node2", "node3"), r
            end = r["t"]
            spans.append((end - r["total_ms"] / 1000, end))
        for t, _ in spans:
            assert sum(1 for a, b in spans if a <= t < b) <= 2, f"more than two migrations at once: {spans}"
        listing = ctl(st, "node3", "vm_ls")
        assert "node1" in listing["paused_nodes"]
        assert all(v["owner"] != "node1" for v in listing["vms"]), listing
        for n in names:
            verify(st, n)
        p = shoal("vm", "start", "dr1", "--on", "node1", env=env(st, "node1"))
        assert p.returncode != 0 and "paused" in p.stderr
    finally:
        shoal_ok("node", "resume", "node1", env=env(st, "node2"))
        for n in names:
            remove(st, n)
    assert "node1" not in ctl(st, "node3", "vm_ls")["paused_nodes"]


# ---- 6. failover: kill, then freeze ----------------------------------------------------------

def test_failover_after_kill_and_freeze_never_two_instances(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    create(st, "fa1", "--memory", "64M", "--test-guest", "memory", "--disk", "vol1:/vms/fa1.raw,size=1M",
           "--preferred-owners", "node2,node3", on="node2")
    create(st, "fa2", "--memory", "64M", "--test-guest", "memory", "--disk", "vol1:/vms/fa2.raw,size=1M",
           "--preferred-owners", "node2,node1", on="node2")
    coord = h.coordinator(st)
    with InstanceWatch("fa1") as w1, InstanceWatch("fa2") as w2:
        t_kill = time.time()
        labo.kill("node2")
        wait_for(lambda: running_on(st, "fa1", "node3", via="node1") and running_on(st, "fa2", "node1"),
                 120, "both VMs restarted on their next preferred owners")
    assert w1.most_running() <= 1 and w2.most_running() <= 1
    survivor = "node1" if coord != "node1" else "node3"
    coord_now = str(h.coordinator(st, survivor))
    fences = [e for e in h.events(st, coord_now, {"fence", "preempt"}) if e["node"] == "node2" and e["t"] >= t_kill
              and (e["kind"] == "fence" or e.get("generations_below") is not None)]
    failovers = [e for e in h.events(st, coord_now, {"vm"}) if e.get("action") == "failover" and e["t"] >= t_kill]
    assert fences, "node2 was never fenced after the kill"
    assert {e["vm"] for e in failovers} == {"fa1", "fa2"}, failovers
    assert min(e["t"] for e in failovers) >= min(e["t"] for e in fences), "a VM moved before node2 was fenced"
    verify(st, "fa1")
    labo.start("node2")
    wait_for(lambda: h.node_view(st, "node2")["state"] == "direct", 90, "node2 back")
    wait_for(lambda: all(h.request_status(st, n)["nodes"][m]["links"]["migration"]["state"] == "up"
                         for n in st.nodes for m in st.nodes if n != m), 60, "every migration link up")
    vm(st, "node1", "migrate", "fa1", "--to", "node2")
    # freeze node2 with fa1 on it: failover after the fence, and the stale copy ends on thaw
    with InstanceWatch("fa1") as w:
        labo.signal_node("node2", signal.SIGSTOP)
        try:
            wait_for(lambda: running_on(st, "fa1", "node3"), 120, "fa1 restarted on node3")
        finally:
            thawed = time.monotonic()
            labo.signal_node("node2", signal.SIGCONT)
        wait_for(lambda: len(find_vm_processes("fa1")) == 1, 30, "the stale copy on node2 ended")
    assert w.most_running(grace_after=thawed, grace_s=5.0) <= 1, w.samples
    wait_for(lambda: h.node_view(st, "node2")["state"] == "direct", 90, "node2 rejoined")
    verify(st, "fa1")
    for n in ("fa1", "fa2"):
        remove(st, n)
