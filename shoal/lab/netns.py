"""Thin iproute2 wrappers (``ip``), with errors turned into sentences."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from shoal.lab.errors import LabToolError

NETNS_DIR = Path("/run/netns")
IP_TIMEOUT_S = 30


def ip(*args: str, input: str | None = None, check: bool = True) -> str:
    if shutil.which("ip") is None:
        raise LabToolError("the lab needs iproute2's 'ip' command; install it with 'apt-get install iproute2'.")
    try:
        res = subprocess.run(["ip", *args], input=input, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise LabToolError(f"'ip {' '.join(args)}' did not finish in {IP_TIMEOUT_S} s.") from err
    if check and res.returncode != 0:
        raise LabToolError(f"'ip {' '.join(args)[:200]}' failed: {res.stderr.strip()[:500]}")
    return res.stdout


def batch(lines: list[str], ns: str | None = None) -> None:
    if not lines:
        return
    args = ["-n", ns] if ns else []
    ip(*args, "-batch", "-", input="\n".join(lines) + "\n")


def list_netns(prefix: str) -> list[str]:
    """The namespaces of the lab whose names start with ``prefix`` (``shoal-NAME-``):
    exactly ``{prefix}sw`` and ``{prefix}node<digits>``, so lab ``a`` never matches the
    namespaces of a lab called ``a-b``."""
    pattern = re.compile(re.escape(prefix) + r"(?:sw|node\d+)")
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if pattern.fullmatch(p.name))
    except FileNotFoundError:
        return []


def netns_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False)
    return [int(x) for x in out.split() if x.isdigit() and int(x) != os.getpid()]


def sysctl_in(ns: str, settings: dict[str, str]) -> None:
    for key, value in settings.items():
        path = "/proc/sys/" + key.replace(".", "/")
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"],
                       capture_output=True, timeout=IP_TIMEOUT_S)


def link_states(ns: str) -> dict[str, str]:
    out = ip("-n", ns, "-br", "link", check=False)
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            name = parts[0].split("@")[0]
            flags = line[line.find("<") + 1 : line.find(">")].split(",") if "<" in line else []
            states[name] = "up" if "UP" in flags else "down"
    return states
