"""Is the lab's storage target serving? ``python -m shoal.lab.probe HOST PORT EXPORT SECONDS [PID]``.

Run where the target's address is reachable (in the switch namespace of a
netns lab). Asks the NBD server for its exports until ``EXPORT`` is among them
(exit 0), the target process ``PID`` is gone, or ``SECONDS`` pass (exit 1, one
sentence on stderr).
"""

from __future__ import annotations

import asyncio
import sys
import time

from shoal.lab import procs
from shoal.nbd.client import list_exports
from shoal.nbd.errors import NBDError

POLL_S = 0.05


async def wait_for_export(host: str, port: int, export: str, timeout_s: float, pid: int | None = None) -> str:
    """Poll until the export is offered; returns "" then, else why not, as one sentence."""
    deadline = time.monotonic() + timeout_s
    last = "nothing answered"
    while True:
        try:
            async with asyncio.timeout(max(0.1, min(2.0, deadline - time.monotonic()))):
                names = await list_exports((host, port), timeout_s=2.0)
            if export in names:
                return ""
            last = f"it offers {', '.join(repr(n) for n in names) or 'no export'} but not {export!r}"
        except (NBDError, OSError, TimeoutError) as err:
            last = str(err) or type(err).__name__
        if pid is not None and not procs.alive(pid):
            return f"its process {pid} exited ({last})."
        if time.monotonic() > deadline:
            return f"it did not answer within {timeout_s:g} s ({last})."
        await asyncio.sleep(POLL_S)


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print("usage: python -m shoal.lab.probe HOST PORT EXPORT SECONDS [PID]", file=sys.stderr)
        return 2
    host, port, export, seconds = argv[0], int(argv[1]), argv[2], float(argv[3])
    pid = int(argv[4]) if len(argv) == 5 else None
    why = asyncio.run(wait_for_export(host, port, export, seconds, pid))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
