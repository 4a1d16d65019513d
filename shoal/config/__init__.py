"""Cluster configuration: one TOML file per cluster, validated at load.

``model`` holds the typed configuration and its loader/writer, ``timing`` the
named timeouts and their relations, ``volumes`` the shared volumes and where
each node finds their LUN. docs/CONFIG.md describes every key. Nothing here
does I/O beyond reading and atomically rewriting the one file.
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
from shoal.config.volumes import Lun, VolumeConfig, parse_lun

__all__ = [
    "PROFILES",
    "ClusterConfig",
    "ConfigError",
    "Lun",
    "Network",
    "Node",
    "Role",
    "Timing",
    "VolumeConfig",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_lun",
    "write_config",
]
