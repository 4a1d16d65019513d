"""Entry point of the ``shoal`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from shoal import __version__
from shoal.errors import ShoalError

#: modules offering ``register(subparsers)``; order is the order in ``--help``
COMMAND_MODULES = [
    "shoal.cli.demo",
    "shoal.volume.cli",
    "shoal.nbd.cli",
    "shoal.config.cli",
    "shoal.agent.cli",
    "shoal.vm.cli",
    "shoal.netft.cli",
    "shoal.lab.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Cluster Shared Volumes, cluster networks and live migration for QEMU hosts.",
    )
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except ShoalError as err:
        print(f"shoal: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
