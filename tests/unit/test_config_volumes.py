"""Shared volumes in the configuration and the I/O timeout they derive their leases from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from shoal.config import (
    PROFILES,
    ConfigError,
    Timing,
    VolumeConfig,
    dump_config,
    load_config,
    parse_config,
    parse_lun,
    write_config,
)
from shoal.config.cli import make_config
from shoal.config.errors import ConfigInvalid

BASE = """
[cluster]
name = "demo"

[[network]]
name = "cluster"
subnet = "198.18.1.0/24"

[[node]]
name = "a"
id = 1
addresses = { cluster = "198.18.1.1" }

[[node]]
name = "b"
id = 2
addresses = { cluster = "198.18.1.2" }
"""

VOLUMES = """
[[volume]]
name = "vol1"
lun = "nbd://198.18.4.250:10809/lun0"
paths = { b = "/dev/mapper/san-lun0" }

[[volume]]
name = "scratch_2"
lun = "/srv/luns/scratch.img"
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as exc:
        parse_config(text)
    assert all(p.endswith(".") for p in exc.value.problems), exc.value.problems
    return exc.value.problems


def test_volumes_load_as_a_model() -> None:
    cfg = parse_config(BASE + VOLUMES)
    assert [v.name for v in cfg.volumes] == ["vol1", "scratch_2"]
    vol1 = cfg.volume("vol1")
    assert isinstance(vol1, VolumeConfig) and vol1.lun == "nbd://198.18.4.250:10809/lun0"
    assert vol1.paths == {"b": "/dev/mapper/san-lun0"}
    assert vol1.url_for("a") == "nbd://198.18.4.250:10809/lun0"
    assert vol1.url_for("b") == "/dev/mapper/san-lun0"
    assert vol1.lun_for("a").is_nbd and vol1.lun_for("b").path == "/dev/mapper/san-lun0"
    assert cfg.volume("scratch_2").paths == {} and hash(vol1)  # frozen and hashable


def test_no_volumes_is_fine() -> None:
    assert parse_config(BASE).volumes == ()


def test_unknown_volume_is_one_sentence_listing_the_declared_ones() -> None:
    cfg = parse_config(BASE + VOLUMES)
    with pytest.raises(ConfigError, match=r"volume 'vol9' is not in cluster 'demo'; its volumes are vol1, scratch_2\."):
        cfg.volume("vol9")
    with pytest.raises(ConfigError, match="declares no volumes"):
        parse_config(BASE).volume("vol1")


@pytest.mark.parametrize(
    ("url", "host", "port", "export", "path"),
    [
        ("nbd://198.18.4.250:10809/lun0", "198.18.4.250", 10809, "lun0", None),
        ("nbd://10.0.0.5/lun0", "10.0.0.5", 10809, "lun0", None),
        ("nbd://10.0.0.5:4000/", "10.0.0.5", 4000, "", None),
        ("nbd://10.0.0.5:4000/vm/disk0", "10.0.0.5", 4000, "vm/disk0", None),
        ("/dev/sdb", None, None, None, "/dev/sdb"),
        ("/srv/lun0.img", None, None, None, "/srv/lun0.img"),
    ],
)
def test_lun_locations_parse(url: str, host: str | None, port: int | None, export: str | None,
                             path: str | None) -> None:
    lun = parse_lun(url)
    assert (lun.url, lun.host, lun.port, lun.export, lun.path) == (url, host, port, export, path)


@pytest.mark.parametrize(
    ("lun", "words"),
    [
        ("iscsi://10.0.0.5/iqn", "neither nbd://HOST:PORT/EXPORT nor an absolute path"),
        ("lun0.img", "neither nbd://HOST:PORT/EXPORT nor an absolute path"),
        ("nbd://storage.example:10809/lun0", "is not an IPv4 address"),
        ("nbd://[fd00::1]:10809/lun0", "is not an IPv4 address"),
        ("nbd://10.0.0.5:0/lun0", "between 1 and 65535"),
        ("nbd://10.0.0.5:port/lun0", "between 1 and 65535"),
        ("nbd://10.0.0.5:10809", "needs the export after the address"),
        ("nbd://10.0.0.5/lun0?socket=/x", "no query"),
        ("/", "is a directory"),
        ("", "give nbd://HOST:PORT/EXPORT or an absolute path"),
    ],
)
def test_bad_lun_is_one_sentence(lun: str, words: str) -> None:
    problems = problems_of(BASE + f'\n[[volume]]\nname = "v"\nlun = "{lun}"\n')
    assert len(problems) == 1 and f"volume 'v' has lun {lun!r}, which is not usable" in problems[0]
    assert words in problems[0], problems


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('name = "vol 1"\nlun = "/dev/sdb"', "has name 'vol 1'; a volume name is 1 to 64 letters"),
        ('name = ""\nlun = "/dev/sdb"', "has name ''"),
        (f'name = "{"v" * 65}"\nlun = "/dev/sdb"', "1 to 64"),
        ('lun = "/dev/sdb"', "volume number 1 has name None"),
        ('name = "v"', "volume 'v' has no lun"),
        ('name = "v"\nlun = 5', "which is not a location in quotes"),
        ('name = "v"\nlun = "/dev/sdb"\nsize = 5', "volume number 1 has an unknown key 'size'"),
        ('name = "v"\nlun = "/dev/sdb"\npaths = { c = "/dev/sdc" }',
         "volume 'v' has a path for node 'c', which is not declared; its nodes are a, b."),
        ('name = "v"\nlun = "/dev/sdb"\npaths = { a = "sdc" }', "volume 'v' has path 'sdc' for node 'a'"),
        ('name = "v"\nlun = "/dev/sdb"\npaths = "/dev/sdc"', "paths must be a table of node = location"),
    ],
)
def test_each_volume_problem_is_one_sentence(table: str, words: str) -> None:
    problems = problems_of(BASE + "\n[[volume]]\n" + table + "\n")
    assert any(words in p for p in problems), problems


def test_duplicate_names_and_other_problems_come_together() -> None:
    text = BASE + VOLUMES + '\n[[volume]]\nname = "vol1"\nlun = "/dev/sdc"\n' + '\n[[volume]]\nname = "x"\n'
    problems = problems_of(text.replace('id = 2', 'id = 1'))
    assert any("volume 'vol1' is declared more than once" in p for p in problems)
    assert any("volume 'x' has no lun" in p for p in problems)
    assert any("node id 1" in p for p in problems)


def test_volume_section_of_the_wrong_kind() -> None:
    # top-level keys go before the first table, or TOML gives them to that table
    assert any("[[volume]] must be an array of tables" in p for p in problems_of("volume = 5\n" + BASE))
    assert any("[[volume]] number 1 is not a table" in p for p in problems_of("volume = [5]\n" + BASE))


def test_round_trip_with_volumes(tmp_path: Path) -> None:
    cfg = parse_config(BASE + VOLUMES + "\n[timing]\nio_timeout_s = 0.25\n", base=tmp_path)
    again = parse_config(dump_config(cfg), base=tmp_path)
    assert again.volumes == cfg.volumes and again.timing.io_timeout_s == 0.25
    write_config(cfg, tmp_path / "cluster.toml")
    loaded = load_config(tmp_path / "cluster.toml")
    assert loaded.volumes == cfg.volumes and loaded.volume("vol1").url_for("b") == "/dev/mapper/san-lun0"


def test_written_volumes_with_odd_node_names_parse_again() -> None:
    cfg = make_config("x", 2)
    cfg = replace(cfg, nodes=(replace(cfg.nodes[0], name="node.1"), cfg.nodes[1]),
                  volumes=(VolumeConfig("v", "nbd://10.0.0.1:10809/e", (("node.1", "/dev/sdb"),)),))
    text = dump_config(cfg)
    assert '"node.1" = "/dev/sdb"' in text
    assert parse_config(text).volume("v").url_for("node.1") == "/dev/sdb"


def test_io_timeout_profiles_and_bounds() -> None:
    assert {n: p.io_timeout_s for n, p in PROFILES.items()} == {"default": 1.0, "relaxed": 2.0, "fast": 0.5}
    assert Timing().io_timeout_s == 1.0
    for bad in (0.05, 0.0, -1.0, 61.0):
        assert any("io_timeout_s" in p and "between 0.1 and 60" in p for p in Timing(io_timeout_s=bad).problems())
    assert Timing(io_timeout_s=0.1).problems() == [] and Timing(io_timeout_s=60).problems() == []


def test_io_timeout_in_the_file() -> None:
    cfg = parse_config(BASE + '\n[timing]\nprofile = "fast"\nio_timeout_s = 3\n')
    assert cfg.timing.io_timeout_s == 3.0 and isinstance(cfg.timing.io_timeout_s, float)
    assert cfg.timing.heartbeat_interval_s == 0.2  # the rest of the profile stays
    assert parse_config(BASE + '\n[timing]\nprofile = "relaxed"\n').timing.io_timeout_s == 2.0
    assert any("between 0.1 and 60" in p for p in problems_of(BASE + "\n[timing]\nio_timeout_s = 0.01\n"))
    assert any("io_timeout_s must be a number of seconds" in p
               for p in problems_of(BASE + '\n[timing]\nio_timeout_s = "1s"\n'))
