"""``network set`` reaches every agent over the authenticated channel, with no
shared filesystem: three agents on loopback, each with its own config file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.agent.control import request
from shoal.config import load_config
from shoal.config.cli import make_config, write_secret
from shoal.config.model import write_config
from tests.system.lab_helpers import shoal_ok, wait_for


@contextmanager
def agents(tmp_path: Path, n: int) -> Iterator[tuple[list[Path], dict[str, subprocess.Popen[bytes]]]]:
    octet = 20 + os.getpid() % 60
    cfg = make_config("prop", n, base=f"127.{octet}.0.0", timing="fast")
    write_secret(tmp_path / "secret")
    dirs = []
    for i in range(1, n + 1):
        d = tmp_path / f"host{i}"
        d.mkdir()
        shutil.copy(tmp_path / "secret", d / "cluster.secret")
        from dataclasses import replace

        write_config(replace(cfg, run_dir=d / "run", secret_file=d / "cluster.secret"), d / "cluster.toml")
        dirs.append(d)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(i: int) -> None:
        procs[f"node{i}"] = subprocess.Popen(
            [sys.executable, "-m", "shoal.agent", "--config", str(dirs[i - 1] / "cluster.toml"), "--node", f"node{i}"],
            stdout=subprocess.DEVNULL, stderr=open(dirs[i - 1] / "agent.log", "ab"), start_new_session=True)

    try:
        for i in range(1, n + 1):
            start(i)
        yield dirs, procs
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def view(d: Path, node: str) -> dict:
    return request(d / "run" / f"{node}.sock", "status", timeout_s=5)


def test_network_set_reaches_every_agent_and_late_ones_catch_up(tmp_path: Path) -> None:
    with agents(tmp_path, 3) as (dirs, procs):
        wait_for(lambda: all(all(v["state"] == "up" for v in view(d, f"node{i}")["nodes"].values())
                             for i, d in enumerate(dirs, 1)), 20, "three agents up")
        shoal_ok("network", "set", "migration", "--role", "none",
                 "--config", str(dirs[0] / "cluster.toml"), "--node", "node1")
        for d in dirs:
            cfg = load_config(d / "cluster.toml")
            assert cfg.generation == 2 and cfg.network("migration").role.value == "none", d
        assert view(dirs[2], "node3")["routes"]["node1"]["migration"] == "public"

        os.killpg(procs["node3"].pid, signal.SIGKILL)
        procs["node3"].wait()
        (dirs[2] / "run" / "node3.sock").unlink(missing_ok=True)
        out = shoal_ok("network", "set", "public", "--metric", "500",
                       "--config", str(dirs[1] / "cluster.toml"), "--node", "node2")
        assert "node3" in out  # said it was not reached
        assert load_config(dirs[2] / "cluster.toml").generation == 2  # node3 is down: its file is old
        procs["node3"] = subprocess.Popen(
            [sys.executable, "-m", "shoal.agent", "--config", str(dirs[2] / "cluster.toml"), "--node", "node3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: load_config(dirs[2] / "cluster.toml").generation == 3, 15, "node3 caught up")
        wait_for(lambda: view(dirs[2], "node3")["routes"]["node1"]["internal"] == "public", 5,
                 "node3 routes internal traffic on the pinned public network")
        assert view(dirs[2], "node3")["metrics"]["public"] == {"value": 500, "auto": False}
