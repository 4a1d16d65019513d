"""Finding and signalling the lab's processes, without broad name matching."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return proc_state(pid) not in ("Z", "X", None)


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def signal_group(pgid: int | None, sig: int) -> None:
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_hard(pgids: list[int], pids: list[int]) -> None:
    """SIGKILL (then SIGCONT, for stopped ones) and wait a little for them to go."""
    for g in pgids:
        signal_group(g, signal.SIGKILL)
        signal_group(g, signal.SIGCONT)
    signal_pids(pids, signal.SIGKILL)
    signal_pids(pids, signal.SIGCONT)
    deadline = time.monotonic() + 5
    for pid in [*pgids, *pids]:
        while alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)



def pids_mentioning_arg(arg: str) -> list[int]:
    """Processes that have ``arg`` as one whole command-line argument (never a substring)."""
    out = []
    me = os.getpid()
    target = arg.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if target in argv:
            out.append(int(entry.name))
    return out
