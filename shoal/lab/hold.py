"""Holding a link: what a node sends on one interface is queued, not dropped, and
delivered (late, in order, intact) only when the link is released.

Run inside the node's namespace: ``python -m shoal.lab.hold hold|release IFNAME IFB``.
The lab does that with ``ip netns exec``; ``Lab.hold_link`` is the caller.

How, without netem (this kernel has none) — everything lives in the node's namespace::

    IFNAME ─egress─▶ clsact: u32 match-all, mirred redirect ─▶ IFB (an ifb device)
                                                               └─ root: tbf, the hold queue

* **hold.** Make IFB, give it a token bucket that sends nothing:
  ``tbf rate 8bit burst 1600 mpu 65535``. A new bucket is full, and every packet
  costs at least ``mpu`` bytes of tokens, i.e. the whole bucket, so exactly one
  packet may pass and the next would wait 65535 s. The lab spends that one
  packet itself — a frame written straight to IFB, which drops frames nobody
  redirected to it — and only *then* redirects IFNAME's egress into IFB. So no
  packet of the node's gets through, not even the first (a token bucket on
  IFNAME itself would let the node's first packet out).
* **release.** ``tc qdisc change`` the bucket to 10 Gbit/s: a change keeps the
  queue (replacing or deleting a qdisc drops what it holds). A change does not
  wake the queue, whose watchdog is armed hours ahead, so one more frame is
  written to IFB as a kick. When IFB's backlog is empty the redirect is removed,
  and when it is empty again IFB is deleted.

The queue holds up to ``QUEUE_LIMIT`` bytes; beyond that packets are dropped,
which TCP rarely reaches because TCP Small Queues keeps most unsent data in the
socket. Packets a node sends are held; what others send to it is not.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

QUEUE_LIMIT = "16mb"
HOLD_QDISC = ("tbf", "rate", "8bit", "burst", "1600", "mpu", "65535", "limit", QUEUE_LIMIT)
PASS_QDISC = ("tbf", "rate", "10gbit", "burst", "1mb", "limit", QUEUE_LIMIT)
DRAIN_TIMEOUT_S = 10.0
TC_TIMEOUT_S = 30
# local experimental ethertype (IEEE 802), so nothing mistakes the frame for traffic
_FRAME = b"\xff" * 6 + b"\x02\x53\xff\xff\xff\xfe" + b"\x88\xb5" + bytes(46)


class HoldError(Exception):
    """A tc / ip command failed; the text is one sentence for the user."""


def hold_device(network_index: int) -> str:
    """The ifb device that holds network k's traffic in a node's namespace."""
    return f"hold{network_index}"


def parse_backlog(tc_stats: str) -> tuple[int, int]:
    """(bytes, packets) queued, from ``tc -s qdisc show dev X`` (its root qdisc)."""
    m = re.search(r"backlog (\d+)b (\d+)p", tc_stats)
    if m is None:
        raise HoldError(f"cannot read the queue length from tc's output: {tc_stats.strip()[:200]!r}")
    return int(m.group(1)), int(m.group(2))


def parse_sent(tc_stats: str) -> tuple[int, int]:
    """(bytes, packets) sent, from ``tc -s qdisc show dev X``."""
    m = re.search(r"Sent (\d+) bytes (\d+) pkt", tc_stats)
    if m is None:
        raise HoldError(f"cannot read the sent counters from tc's output: {tc_stats.strip()[:200]!r}")
    return int(m.group(1)), int(m.group(2))


def _run(*cmd: str, check: bool = True) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TC_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise HoldError(f"'{' '.join(cmd)}' did not finish in {TC_TIMEOUT_S} s.") from err
    if check and res.returncode != 0:
        raise HoldError(f"'{' '.join(cmd)}' failed: {res.stderr.strip()[:300]}")
    return res.stdout


def _frame(ifb: str) -> None:
    """One frame written to the ifb: it spends the bucket's tokens (or kicks the queue)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifb, 0))
        s.send(_FRAME)


def _stats(ifb: str) -> str:
    return _run("tc", "-s", "qdisc", "show", "dev", ifb)


def hold(ifname: str, ifb: str) -> str:
    if shutil.which("tc") is None:
        raise HoldError("holding a link needs iproute2's 'tc'; install it with 'apt-get install iproute2'.")
    _run("ip", "link", "add", ifb, "type", "ifb")
    try:
        _run("ip", "link", "set", ifb, "up")
        _run("tc", "qdisc", "replace", "dev", ifb, "root", *HOLD_QDISC)
        _frame(ifb)
        deadline = time.monotonic() + 2
        while parse_sent(_stats(ifb))[1] < 1:  # the bucket's one packet is spent
            if time.monotonic() > deadline:
                raise HoldError(f"the hold queue on {ifb} did not take its first frame.")
            time.sleep(0.005)
        _run("tc", "qdisc", "add", "dev", ifname, "clsact")
        _run("tc", "filter", "add", "dev", ifname, "egress", "protocol", "all", "u32", "match", "u32", "0", "0",
             "action", "mirred", "egress", "redirect", "dev", ifb)
    except BaseException:
        _run("tc", "qdisc", "del", "dev", ifname, "clsact", check=False)
        _run("ip", "link", "del", ifb, check=False)
        raise
    return f"what the node sends on {ifname} is queued in {ifb}"


def _drain(ifb: str, timeout_s: float) -> tuple[int, int]:
    """Wait until the queue is empty; returns what is still queued at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = parse_backlog(_stats(ifb))
        if left[1] == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def release(ifname: str, ifb: str, timeout_s: float = DRAIN_TIMEOUT_S) -> str:
    queued = parse_backlog(_stats(ifb))
    _run("tc", "qdisc", "change", "dev", ifb, "root", *PASS_QDISC)
    _frame(ifb)
    left = _drain(ifb, timeout_s)
    _run("tc", "qdisc", "del", "dev", ifname, "clsact", check=False)
    left = _drain(ifb, 1.0)
    _run("ip", "link", "del", ifb)
    text = f"{queued[1]} held packet{'' if queued[1] == 1 else 's'} ({queued[0]} bytes) delivered late"
    if left[1]:
        text += f"; {left[1]} could not be sent within {timeout_s:g} s and were dropped"
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("hold", "release"):
        print("usage: python -m shoal.lab.hold hold|release IFNAME IFB", file=sys.stderr)
        return 2
    verb, ifname, ifb = argv
    try:
        print(hold(ifname, ifb) if verb == "hold" else release(ifname, ifb))
    except (HoldError, OSError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
