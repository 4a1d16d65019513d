"""The cluster configuration: what loads, and one clear sentence per problem."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.config import ConfigError, Role, dump_config, load_config, parse_config
from shoal.config.cli import make_config
from shoal.config.errors import ConfigInvalid
from shoal.config.timing import PROFILES, Timing

GOOD = """
[cluster]
name = "demo"
secret_file = "cluster.secret"
run_dir = "/run/shoal"

[[network]]
name = "cluster"
subnet = "198.18.1.0/24"
role = "cluster"

[[network]]
name = "public"
subnet = "198.18.2.0/24"
role = "cluster-and-client"
metric = 500

[[node]]
name = "a"
id = 1
addresses = { cluster = "198.18.1.1", public = "198.18.2.1" }

[[node]]
name = "b"
id = 2
addresses = { cluster = "198.18.1.2", public = "198.18.2.2" }
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as exc:
        parse_config(text)
    return exc.value.problems


def test_good_config_loads() -> None:
    cfg = parse_config(GOOD)
    assert cfg.name == "demo"
    assert [n.name for n in cfg.networks] == ["cluster", "public"]
    assert cfg.network("public").metric == 500 and cfg.network("cluster").metric is None
    assert cfg.network("public").role is Role.CLUSTER_AND_CLIENT
    assert cfg.node("b").addresses["cluster"] == "198.18.1.2"
    assert cfg.timing == PROFILES["default"] and cfg.timing.link_down_after_s == 5.0


def test_round_trip(tmp_path: Path) -> None:
    cfg = make_config("x", 4, timing="fast")
    text = dump_config(cfg)
    again = parse_config(text, base=tmp_path)
    assert again.networks == cfg.networks and again.nodes == cfg.nodes
    assert again.timing == PROFILES["fast"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('subnet = "198.18.2.0/24"', 'subnet = "198.18.1.128/25"'), "overlap"),
        (('public = "198.18.2.2"', 'public = "198.18.2.2", backup = "10.0.0.1"'),
         "node 'b' has an address on network 'backup', which is not declared"),
        (('public = "198.18.2.2"', 'public = "198.18.3.2"'), "outside its subnet 198.18.2.0/24"),
        (('id = 2', 'id = 1'), "node id 1 is used by more than one node"),
        (('role = "cluster"', 'role = "heartbeat"'), "use none, cluster or cluster-and-client"),
        (('metric = 500', 'metric = -1'), 'use "auto" or a positive whole number'),
        ((', public = "198.18.2.2" }', ' }'), "node 'b' has no address on cluster network 'public'"),
        (('[cluster]', '[cluster]\nnmae = "typo"'), "unknown key 'nmae'"),
    ],
)
def test_each_problem_is_one_sentence(change: tuple[str, str], expected: str) -> None:
    problems = problems_of(GOOD.replace(*change, 1))
    assert any(expected in p for p in problems), problems
    assert all(p.endswith(".") for p in problems)


def test_pinned_metrics_must_differ() -> None:
    text = GOOD.replace('role = "cluster"\n', 'role = "cluster"\nmetric = 500\n', 1)
    assert any("both have metric 500" in p for p in problems_of(text))


def test_contradicting_timeouts() -> None:
    text = GOOD + "\n[timing]\nheartbeat_interval_s = 0.2\nheartbeat_threshold = 5\nrpc_connect_timeout_s = 2.0\n"
    problems = problems_of(text)
    assert any("rpc_connect_timeout_s (2.0 s) must be shorter" in p for p in problems), problems
    assert any("threshold" in p for p in problems_of(GOOD + "\n[timing]\nheartbeat_threshold = 1\n"))
    assert any("unknown" in p for p in problems_of(GOOD + "\n[timing]\nprofile = \"turbo\"\n"))


def test_every_profile_is_consistent() -> None:
    for name, t in PROFILES.items():
        assert t.problems() == [], name
    assert Timing(rpc_call_timeout_s=1.0, rpc_connect_timeout_s=2.0).problems()


def test_several_problems_reported_together() -> None:
    text = GOOD.replace('id = 2', 'id = 1').replace('subnet = "198.18.2.0/24"', 'subnet = "nonsense"')
    with pytest.raises(ConfigInvalid) as exc:
        parse_config(text, source="c.toml")
    assert len(exc.value.problems) >= 2 and str(exc.value).startswith("c.toml has")


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shoal cluster init"):
        load_config(tmp_path / "nope.toml")


def test_cluster_init_writes_config_and_secret(tmp_path: Path) -> None:
    cfgp = tmp_path / "etc" / "cluster.toml"
    p = subprocess.run([sys.executable, "-m", "shoal", "cluster", "init", str(cfgp), "--name", "prod",
                        "--nodes", "4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    cfg = load_config(cfgp)
    assert cfg.name == "prod" and len(cfg.nodes) == 4
    assert [(n.name, n.role.value) for n in cfg.networks] == [
        ("cluster", "cluster"), ("public", "cluster-and-client"), ("migration", "cluster"), ("storage", "none")]
    secret = tmp_path / "etc" / "cluster.secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and len(cfg.read_secret()) >= 32
    again = subprocess.run([sys.executable, "-m", "shoal", "cluster", "init", str(cfgp)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    check = subprocess.run([sys.executable, "-m", "shoal", "cluster", "check", str(cfgp)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "valid" in check.stdout
    cfgp.write_text(cfgp.read_text().replace('role = "none"', 'role = "bogus"'))
    bad = subprocess.run([sys.executable, "-m", "shoal", "cluster", "check", str(cfgp)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "role 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
