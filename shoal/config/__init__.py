"""Cluster configuration: one TOML file per cluster, validated at load.

``model`` holds the typed configuration and its loader/writer, ``timing`` the
named timeouts and their relations. Nothing here does I/O beyond reading and
atomically rewriting the one file.
"""

from shoal.config.errors import ConfigError
from shoal.config.model import (
    ClusterConfig,
    Network,
    Node,
    Role,
    dump_config,
    load_config,
    parse_config,
    write_config,
)
from shoal.config.timing import PROFILES, Timing

__all__ = [
    "PROFILES",
    "ClusterConfig",
    "ConfigError",
    "Network",
    "Node",
    "Role",
    "Timing",
    "dump_config",
    "load_config",
    "parse_config",
    "write_config",
]
