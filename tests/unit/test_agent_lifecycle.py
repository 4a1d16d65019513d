"""The agent in the foreground: starts, answers, and stops cleanly on SIGTERM/SIGINT
sent to its whole process group (systemd's stop, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.agent.control import request
from shoal.config.cli import make_config, write_secret
from shoal.config.model import write_config


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_stops_cleanly_on_group_signal(tmp_path: Path, sig: int) -> None:
    cfg = make_config("life", 2, run_dir=str(tmp_path / "run"), base=f"127.{90 + os.getpid() % 30}.0.0")
    write_secret(tmp_path / "cluster.secret")
    write_config(cfg, tmp_path / "cluster.toml")
    p = subprocess.Popen([sys.executable, "-m", "shoal", "node", "run", "--config", str(tmp_path / "cluster.toml"),
                          "--node", "node1"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        sock = tmp_path / "run" / "node1.sock"
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        view = request(sock, "status")
        assert view["nodes"]["node2"]["state"] == "down" and view["node"] == "node1"
        again = subprocess.run([sys.executable, "-m", "shoal", "node", "run", "--config",
                                str(tmp_path / "cluster.toml"), "--node", "node1"],
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "already running" in again.stderr
        os.killpg(p.pid, sig)
        _, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert "agent stopping" in err and "Traceback" not in err
    assert not sock.exists()
