#!/usr/bin/env python3
"""Long crash-consistency run of the volume: SIGKILL a random metadata workload N times.

Uses the harness of tests/integration/test_volume_crash.py (its module docstring says
what each trial checks). Prints trials, failures and time; exits 1 on any failure.

    python bench/crash_stress.py [--trials 2000] [--seed S] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_volume_crash import run_trials  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None, help="harness seed (default: random, printed)")
    p.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"crash stress: {args.trials} trials, seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="shoal-crash-") as tmp:
        stats = run_trials(args.trials, Path(args.dir or tmp), seed=seed, progress=True)
    print(f"trials {stats.trials}  failures {len(stats.failures)}  time {stats.seconds:.1f} s")
    print(stats.summary())
    for failure in stats.failures[:20]:
        print(f"FAIL {failure}")
    return 1 if stats.failures or stats.trials < args.trials else 0


if __name__ == "__main__":
    raise SystemExit(main())
