"""Finding the configuration and this node's name for a CLI command.

Order: ``--config`` / ``--node``; then ``SHOAL_CONFIG`` / ``SHOAL_NODE`` (set by
``shoal lab exec``); then /etc/shoal/cluster.toml and the node whose name is
this host's short hostname.
"""

from __future__ import annotations

import argparse
import os
import socket

from shoal.config.errors import ConfigError
from shoal.config.model import ClusterConfig, load_config

DEFAULT_CONFIG = "/etc/shoal/cluster.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"cluster configuration (default $SHOAL_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("--node", help="this node's name (default $SHOAL_NODE or the short hostname)")


def resolve(args: argparse.Namespace) -> tuple[ClusterConfig, str]:
    path = getattr(args, "config", None) or os.environ.get("SHOAL_CONFIG") or DEFAULT_CONFIG
    cfg = load_config(path)
    node = getattr(args, "node", None) or os.environ.get("SHOAL_NODE")
    if not node:
        host = socket.gethostname().split(".")[0]
        if any(n.name == host for n in cfg.nodes):
            node = host
        else:
            raise ConfigError(
                f"which node is this? {host!r} is not a node of cluster {cfg.name!r}; pass --node or set SHOAL_NODE."
            )
    cfg.node(node)
    return cfg, node
