"""Cluster Shared Volumes in a 3-node lab: direct and redirected I/O, coordinator move,
failover, fencing, storage loss everywhere, and online defrag — each with a writer that
checks every block it reads back (shoal.lab.writer).

One lab for the module (default timing: I/O timeout T = 1 s, heartbeats every 1 s); each
test leaves every node running and its storage path up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.agent.errors import ControlError
from shoal.lab.lab import Lab, LabState
from tests.system import csv_helpers as h
from tests.system.lab_helpers import running_lab, shoal_ok, wait_for

pytestmark = pytest.mark.timeout(900)

T = 1.0  # the default profile's I/O timeout
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, LabState]]:
    with running_lab(tmp_path_factory.mktemp("csv"), 3) as (lab, st):
        wait_for(lambda: h.coordinator(st) is not None and all(
            v["state"] == "direct" for v in h.volume_ls(st, "node1")["nodes"].values()), 60,
            "a coordinator and every node direct")
        yield lab, st


def _healthy(st: LabState) -> None:
    wait_for(lambda: all(v["state"] == "direct" for v in h.volume_ls(st, "node1")["nodes"].values()), 60,
             "every node back to direct")


def _non_coordinator(st: LabState) -> tuple[str, str]:
    c = h.coordinator(st)
    assert c is not None
    return c, h.others(st, c)[0]


def test_direct_io_from_a_non_coordinator(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    coord, node = _non_coordinator(st)
    h.create(st, node, "/direct.raw", 64 * MiB)
    before = {n: h.node_view(st, n)["counters"] for n in (coord, node)}
    p = h.qemu_io(st, node, "/direct.raw", "write -P 0x5a 0 16M", "read -P 0x5a 0 16M", "read -P 0 16M 1M")
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr
    after = {n: h.node_view(st, n)["counters"] for n in (coord, node)}
    assert after[node]["direct_bytes"] - before[node]["direct_bytes"] >= 32 * MiB
    assert after[node]["redirected_bytes"] == before[node]["redirected_bytes"]
    # the coordinator performed none of node's data I/O: only allocations crossed the network
    assert after[coord]["served_bytes"] == before[coord]["served_bytes"]
    assert h.file_op(st, node, "stat", path="/direct.raw")["allocated"] == 16 * MiB


def test_storage_link_fault_redirects_without_errors(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    coord, node = _non_coordinator(st)
    h.create(st, node, "/redirect.raw", 64 * MiB)
    h.create(st, node, "/redirect-1m.raw", 64 * MiB)
    w = h.start_writer(st, node, "/redirect.raw", seed=21)
    # 1 MiB blocks too: their redirected reads are spliced through the coordinator,
    big = h.start_writer(st, node, "/redirect-1m.raw", seed=22, block_size=MiB)
    spliced = {k: h.node_view(st, coord)["counters"][k] for k in ("served_spliced", "served_spliced_writes")}
    time.sleep(2)
    labo.set_link(node, "storage", up=False)
    took = wait_for(lambda: h.node_view(st, node)["state"] == "redirected", 30, f"{node} redirected")
    view = h.node_view(st, node)
    assert view["reasons"] == ["no-disk-connectivity"], view
    assert took < 4 * T + 2, f"redirected only after {took:.1f} s"
    time.sleep(3)
    labo.set_link(node, "storage", up=True)
    wait_for(lambda: h.node_view(st, node)["state"] == "direct", 30, f"{node} back to direct by itself")
    time.sleep(1)
    result = w.stop()
    h.assert_clean(result, "storage link fault")
    h.assert_clean(big.stop(), "storage link fault, 1 MiB blocks")
    counters = h.node_view(st, node)["counters"]
    assert counters["redirected_requests"] > 0 and counters["direct_requests"] > 0
    # and their redirected writes are spliced through it the other way
    served = h.node_view(st, coord)["counters"]
    assert all(served[k] > n for k, n in spliced.items()), (served, spliced)


def test_held_write_never_lands_after_a_rewrite_through_the_coordinator(lab: tuple[Lab, LabState]) -> None:
    """The node's first write is held in the network; the node times out, redirects
    it, and the block is rewritten through the coordinator. Then the held packets are
    released: the target must refuse them (preempted), so the block keeps the rewrite."""
    labo, st = lab
    _, node = _non_coordinator(st)
    h.create(st, node, "/held.raw", 8 * MiB)
    p = h.qemu_io(st, node, "/held.raw", "write -P 0x01 0 1M")  # allocate while the path is healthy
    assert p.returncode == 0, p.stderr
    shoal_ok("lab", "hold", "link", node, "storage", "--dir", st.dir)
    try:
        p = h.qemu_io(st, node, "/held.raw", "write -P 0x11 0 64k", "write -P 0x22 0 64k")
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
        assert h.node_view(st, node)["state"] == "redirected"
    finally:
        shoal_ok("lab", "release", "link", node, "storage", "--dir", st.dir)
    time.sleep(3)  # the held packets are delivered now
    other = h.others(st, node)[-1]
    p = h.qemu_io(st, other, "/held.raw", "read -P 0x22 0 64k", "read -P 0x01 64k 960k")
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr
    _healthy(st)


def test_move_during_writes_from_every_node(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    coord = h.coordinator(st)
    target = h.others(st, str(coord))[0]
    writers = []
    for i, node in enumerate(st.nodes):
        h.create(st, node, f"/move{i}.raw", 64 * MiB)
        writers.append(h.start_writer(st, node, f"/move{i}.raw", seed=30 + i))
    # a hundred allocations, each a journal record: the coordinator checkpoints them
    # before the pause, so that its successor does not replay them inside it
    h.create(st, target, "/sparse-move.raw", 256 * MiB)
    p = h.qemu_io(st, target, "/sparse-move.raw", *(f"write -P 7 {i * 2}M 4k" for i in range(100)))
    assert p.returncode == 0, p.stdout + p.stderr
    time.sleep(2)
    out = shoal_ok("volume", "move", h.VOLUME, "--to", target, "--json",
                   env={"SHOAL_CONFIG": str(st.config), "SHOAL_NODE": st.nodes[0]})
    moved = json.loads(out)
    assert moved["paused_ms"] > 0 and moved["to"] == target
    assert moved["replayed"] < 100, f"the new coordinator replayed {moved['replayed']} journal records in the pause"
    assert h.coordinator(st, st.nodes[0]) == target
    time.sleep(2)
    for w in writers:
        h.assert_clean(w.stop(), f"writer on {w.node} during the move")


def test_coordinator_killed_during_writes(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    coord = str(h.coordinator(st))
    writers = []
    for i, node in enumerate(h.others(st, coord)):
        h.create(st, node, f"/kill{i}.raw", 32 * MiB)
        writers.append(h.start_writer(st, node, f"/kill{i}.raw", seed=40 + i))
    time.sleep(2)
    labo.kill(coord)
    survivor = h.others(st, coord)[0]
    wait_for(lambda: h.coordinator(st, survivor) not in (None, coord), 60, "another node takes the role")
    time.sleep(2)
    for w in writers:
        h.assert_clean(w.stop(), f"writer on {w.node} across the failover")
    labo.start(coord)
    _healthy(st)
    r = h.request_repair(st, survivor, "fsck")
    assert not r["problems"] and not r["report"]["problems"], r


def test_coordinator_loses_its_storage_path(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    coord = str(h.coordinator(st))
    writers = []
    for i, node in enumerate(st.nodes):
        h.create(st, node, f"/cpath{i}.raw", 32 * MiB)
        writers.append(h.start_writer(st, node, f"/cpath{i}.raw", seed=50 + i))
    time.sleep(2)
    labo.set_link(coord, "storage", up=False)
    try:
        wait_for(lambda: h.coordinator(st, h.others(st, coord)[0]) not in (None, coord), 30,
                 "the role moves to a node with a working path")
        wait_for(lambda: all(v["state"] != "paused" for v in h.volume_ls(st, coord)["nodes"].values()), 30,
                 "nobody stays paused")
        assert h.node_view(st, coord)["state"] == "redirected"
        time.sleep(2)
    finally:
        labo.set_link(coord, "storage", up=True)
    _healthy(st)
    for w in writers:
        h.assert_clean(w.stop(), f"writer on {w.node} while the coordinator lost its path")


def _role_intervals(st: LabState) -> list[tuple[str, float, float]]:
    """(node, start, end) of every stretch a node was coordinator, from the agents' events."""
    out = []
    for node in st.nodes:
        start = None
        for e in h.events(st, node, {"coordinator-role"}):
            if e["new"] == "coordinator":
                start = e["t"]
            elif e["old"] == "coordinator" and start is not None:
                out.append((node, start, e["t"]))
                start = None
        if start is not None:
            out.append((node, start, time.time()))
    return out


def test_partition_isolated_node_never_two_coordinators(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    first = st.nodes[0]
    if h.coordinator(st) != first:
        shoal_ok("volume", "move", h.VOLUME, "--to", first, env={"SHOAL_CONFIG": str(st.config),
                                                                 "SHOAL_NODE": first})
    nets = ["cluster", "public", "migration"]
    for net in nets:
        labo.set_link(first, net, up=False)
    try:
        other = h.others(st, first)[0]
        wait_for(lambda: h.coordinator(st, other) not in (None, first), 60,
                 "the majority side takes the role (the isolated node stepped down)")
        new = str(h.coordinator(st, other))
        wait_for(lambda: h.request_status(st, new)["nodes"][first]["state"] == "isolated", 30,
                 f"{first} is isolated (disk alive), not down, as the new coordinator {new} sees it")
    finally:
        for net in nets:
            labo.set_link(first, net, up=True)
    _healthy(st)
    spans = sorted(_role_intervals(st), key=lambda s: s[1])
    for a, b in zip(spans, spans[1:], strict=False):
        assert a[2] <= b[1] + 0.05, f"two coordinators at once: {a} and {b}"


def test_frozen_node_serves_nothing_until_it_rejoined(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    coord, node = _non_coordinator(st)
    other = [n for n in st.nodes if n not in (coord, node)][0]
    h.create(st, node, "/frozen.raw", 8 * MiB)
    assert h.qemu_io(st, node, "/frozen.raw", "write -P 0x01 0 1M").returncode == 0
    h.freeze_agent(st, node, True)
    try:
        queued = __import__("subprocess").Popen(
            h.ns_cmd(st, node, ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k",
                                f"nbd+unix:///frozen.raw?socket={h.nbd_socket(st, node)}"]),
            stdout=-1, stderr=-1, text=True)
        time.sleep(8 * T + 3)  # past the lease: the coordinator fences the node
        p = h.qemu_io(st, other, "/frozen.raw", "write -P 0x22 0 64k")
        assert p.returncode == 0, p.stderr
    finally:
        h.freeze_agent(st, node, False)
    out, err = queued.communicate(timeout=60)
    wait_for(lambda: h.node_view(st, node)["state"] == "direct", 60, f"{node} rejoined")
    assert queued.returncode != 0 or "error" in out.lower(), f"the queued write was not refused: {out}{err}"
    assert "wrote" not in out, f"the queued write was acknowledged: {out}"
    fences = [e for e in h.events(st, coord, {"fence"}) if e["node"] == node]
    assert fences, "the coordinator never fenced the frozen node"
    time.sleep(2)
    p = h.qemu_io(st, other, "/frozen.raw", "read -P 0x22 0 64k")
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout


def test_every_node_loses_the_lun(lab: tuple[Lab, LabState]) -> None:
    labo, st = lab
    writers = []
    for i, node in enumerate(st.nodes):
        h.create(st, node, f"/all{i}.raw", 32 * MiB)
        writers.append(h.start_writer(st, node, f"/all{i}.raw", seed=60 + i))
    time.sleep(2)
    fences_before = sum(len(h.events(st, n, {"fence", "fenced"})) for n in st.nodes)
    for node in st.nodes:
        labo.set_link(node, "storage", up=False)
    time.sleep(8 * T + 4)
    for node in st.nodes:
        labo.set_link(node, "storage", up=True)
    _healthy(st)
    time.sleep(1)
    for w in writers:
        h.assert_clean(w.stop(), f"writer on {w.node} across the outage")
    assert sum(len(h.events(st, n, {"fence", "fenced"})) for n in st.nodes) == fences_before


def test_defrag_while_other_nodes_write(lab: tuple[Lab, LabState]) -> None:
    _, st = lab
    coord = str(h.coordinator(st))
    # a refusal by the coordinator reaches the node that forwarded it as its sentence
    with pytest.raises(ControlError, match=r"^node\d: repair runs fsck or defrag, not 'bogus'$"):
        h.request_repair(st, h.others(st, coord)[0], "bogus")
    writers = []
    for i, node in enumerate(h.others(st, coord)):
        h.create(st, node, f"/defrag{i}.raw", 32 * MiB)
        writers.append(h.start_writer(st, node, f"/defrag{i}.raw", seed=70 + i))
    time.sleep(3)  # random writes: the files' units are allocated out of order
    r: dict[str, Any] = h.request_repair(st, h.others(st, coord)[0], "defrag")
    assert r["report"]["moved"], r
    time.sleep(2)
    for w in writers:
        h.assert_clean(w.stop(), f"writer on {w.node} during defrag")
    for i in range(len(writers)):
        assert h.file_op(st, coord, "stat", path=f"/defrag{i}.raw")["extents"] == 1
    assert not h.volume_ls(st, coord)["maintenance"]


def test_online_file_commands_and_nbd_path(lab: tuple[Lab, LabState], tmp_path: Path) -> None:
    _, st = lab
    env = {"SHOAL_CONFIG": str(st.config), "SHOAL_NODE": st.nodes[1]}
    src = tmp_path / "src.img"
    src.write_bytes(b"\0" * MiB + b"shoal" * 1000 + b"\0" * MiB)
    shoal_ok("file", "mkdir", f"{h.VOLUME}:/online", env=env)
    shoal_ok("file", "import", str(src), f"{h.VOLUME}:/online/a.img", env=env)
    assert "a.img" in shoal_ok("file", "ls", f"{h.VOLUME}:/online", env=env)
    shoal_ok("file", "export", f"{h.VOLUME}:/online/a.img", str(tmp_path / "back.img"), env=env)
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()
    uri = shoal_ok("nbd", "path", f"{h.VOLUME}:/online/a.img", env=env).strip()
    assert uri.startswith("nbd+unix:///online/a.img?socket=")
    shoal_ok("file", "rm", "-r", f"{h.VOLUME}:/online", env=env)
