"""Values of the wrong kind in a config are one sentence each, never a traceback, and
what shoal writes back always parses again."""

from __future__ import annotations

import pytest

from shoal.config import dump_config, parse_config
from shoal.config.cli import make_config
from shoal.config.errors import ConfigInvalid


@pytest.mark.parametrize("old, new, words", [
    ('profile = "default"', "profile = [1]", "profile"),
    ('profile = "default"', 'profile = "default"\nrpc_connect_timeout_s = nan', "finite"),
    ('profile = "default"', 'profile = "default"\nrpc_call_timeout_s = inf', "finite"),
    ("heartbeat_port = 3343", "heartbeat_port = true", "heartbeat_port"),
    ("generation = 1", "generation = true", "generation"),
    ('name = "x"', 'name = "a\\nb"', "printable"),
    ('run_dir = "/run/shoal"', "run_dir = 5", "run_dir"),
])
def test_values_of_the_wrong_kind(old: str, new: str, words: str) -> None:
    text = dump_config(make_config("x", 2))
    assert old in text
    with pytest.raises(ConfigInvalid) as err:
        parse_config(text.replace(old, new, 1))
    assert words in str(err.value)


def test_written_strings_parse_again() -> None:
    cfg = make_config("zürich-ü", 2)
    assert parse_config(dump_config(cfg)).name == "zürich-ü"
