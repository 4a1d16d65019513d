"""``python -m shoal.agent --config FILE --node NAME``: the agent without the full CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from shoal.agent.cli import run_agent
from shoal.errors import ShoalError


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.agent")
    p.add_argument("--config", required=True)
    p.add_argument("--node", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run_agent(args.config, args.node)
    except ShoalError as err:
        print(f"shoal: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
