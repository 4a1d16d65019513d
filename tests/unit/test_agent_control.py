"""The control socket client and the CLI around it, with no agent running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.agent.control import request
from shoal.agent.errors import AgentNotRunning
from shoal.config.cli import make_config, write_secret
from shoal.config.model import write_config


def test_no_agent_is_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(AgentNotRunning, match="start it with 'shoal node run'"):
        request(tmp_path / "node1.sock", "status")


def test_cli_without_agent_or_node(tmp_path: Path) -> None:
    cfg = make_config("c", 2, run_dir=str(tmp_path / "run"))
    write_secret(tmp_path / "cluster.secret")
    write_config(cfg, tmp_path / "cluster.toml")
    env = {"PATH": "/usr/bin:/bin", "SHOAL_CONFIG": str(tmp_path / "cluster.toml")}
    for args, code, text in (
        (["node", "ls", "--node", "node1"], 3, "no node agent answers"),
        (["network", "ls", "--node", "node9"], 2, "node 'node9' is not in cluster 'c'"),
        (["network", "set", "cluster", "--node", "node1"], 2, "--role and/or --metric"),
        (["network", "set", "cluster", "--metric", "x", "--node", "node1"], 2, "whole number or 'auto'"),
    ):
        p = subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert p.returncode == code and text in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr


def test_agent_refuses_second_instance_and_bad_secret(tmp_path: Path) -> None:
    cfg = make_config("c", 2, run_dir=str(tmp_path / "run"), base="127.77.0.0")
    (tmp_path / "cluster.secret").write_text("short\n")
    write_config(cfg, tmp_path / "cluster.toml")
    p = subprocess.run([sys.executable, "-m", "shoal", "node", "run", "--config", str(tmp_path / "cluster.toml"),
                        "--node", "node1"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "needs at least 32" in p.stderr and "Traceback" not in p.stderr
