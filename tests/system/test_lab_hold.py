"""``shoal lab hold link``: what a node sends on a link is queued, not dropped, and
arrives only after ``release link``, late and intact. Checked with a real TCP stream
from a node's namespace to a listener on the storage target's address."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.lab.errors import LabError
from shoal.lab.hold import hold_device, parse_backlog, parse_sent
from shoal.lab.lab import Lab, LabState
from tests.system.lab_helpers import all_up, running_lab, shoal, shoal_ok, status, wait_for

HOLD_S = 2.5  # longer than TCP's first retransmission timeout (1 s)
SIZE = 1 << 20
PORT = 5555

LISTENER = r"""
import hashlib, json, socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
h, n, first = hashlib.sha256(), 0, None
while data := conn.recv(1 << 16):
    if first is None:
        first = time.monotonic()
    h.update(data)
    n += len(data)
print(json.dumps({"first": first, "last": time.monotonic(), "bytes": n, "sha256": h.hexdigest()}), flush=True)
"""

SENDER = r"""
import socket, sys, time
payload = bytes(range(256)) * (int(sys.argv[3]) // 256)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
sys.stdin.readline()
print(time.monotonic(), flush=True)
s.settimeout(60)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
s.recv(1)  # until the listener has read everything and closed
"""


def payload_sha256() -> str:
    return hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()


def in_ns(started: list[subprocess.Popen[str]], ns: str, code: str, *args: str,
          stdin: bool = False) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], text=True,
                         stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None)
    started.append(p)
    return p


def kill_all(started: list[subprocess.Popen[str]]) -> None:
    for p in started:
        p.kill()
        p.wait()


def target_host(st: LabState) -> str:
    return st.target.removeprefix("nbd://").split(":")[0]


def test_held_stream_arrives_after_release_intact(tmp_path: Path) -> None:
    with running_lab(tmp_path, 2) as (lab, st):
        wait_for(lambda: all_up(st), 20, "all links of a fresh 2-node lab up")
        host = target_host(st)
        started: list[subprocess.Popen[str]] = []
        try:
            listener = in_ns(started, st.switch, LISTENER, host, str(PORT))
            assert listener.stdout and listener.stdout.readline().strip() == "ready"
            sender = in_ns(started, st.ns("node1"), SENDER, host, str(PORT), str(SIZE), stdin=True)
            assert sender.stdout and sender.stdin and sender.stdout.readline().strip() == "connected"

            out = lab.hold_link("node1", "storage", True)
            assert "held" in out and lab.status()["nodes"]["node1"]["held"] == ["storage"]
            assert "held: storage" in shoal_ok("lab", "status", "--dir", st.dir)
            sender.stdin.write("go\n")
            sender.stdin.flush()
            sent_at = float(sender.stdout.readline())
            time.sleep(HOLD_S)
            assert listener.poll() is None
            # the other links are not held: node2 still sees node1 up
            assert all(v["state"] == "up" for v in status(st, "node2")["nodes"].values())
            released_at = time.monotonic()
            out = lab.hold_link("node1", "storage", False)
            result = json.loads(listener.communicate(timeout=30)[0])
            assert sender.wait(30) == 0
        finally:
            kill_all(started)
        held = re.search(r"released: (\d+) held packets? \((\d+) bytes\) delivered late", out)
        assert held and int(held.group(1)) > 0, out
        assert result["first"] is not None and result["first"] >= released_at, (result, released_at)
        assert result["first"] - sent_at >= HOLD_S
        assert result["bytes"] == SIZE and result["sha256"] == payload_sha256()
        assert lab.status()["nodes"]["node1"]["held"] == []
        assert hold_device(4) not in subprocess.run(["ip", "-n", st.ns("node1"), "-br", "link"],
                                                    capture_output=True, text=True).stdout
        # idempotent both ways, and the CLI says what happened
        assert "not held" in lab.hold_link("node1", "storage", False)
        assert "held" in shoal_ok("lab", "hold", "link", "node2", "storage", "--dir", st.dir)
        assert "already held" in shoal_ok("lab", "hold", "link", "node2", "storage", "--dir", st.dir)
        assert re.search(r"node2: link storage released: \d+ held packets? \(\d+ bytes\) delivered late",
                         shoal_ok("lab", "release", "link", "node2", "storage", "--dir", st.dir))
        with pytest.raises(LabError, match="no network 'backup'"):
            lab.hold_link("node1", "backup", True)


def test_a_connection_opened_during_a_hold_completes_after_release(tmp_path: Path) -> None:
    with running_lab(tmp_path, 1) as (lab, st):
        host = target_host(st)
        lab.hold_link("node1", "storage", True)
        started: list[subprocess.Popen[str]] = []
        try:
            listener = in_ns(started, st.switch, LISTENER, host, str(PORT))
            assert listener.stdout and listener.stdout.readline().strip() == "ready"
            sender = in_ns(started, st.ns("node1"), SENDER, host, str(PORT), str(SIZE), stdin=True)
            time.sleep(1.5)  # the SYN waits in the hold queue
            assert sender.poll() is None
            released_at = time.monotonic()
            lab.hold_link("node1", "storage", False)
            assert sender.stdout and sender.stdin and sender.stdout.readline().strip() == "connected"
            sender.stdin.write("go\n")
            sender.stdin.flush()
            result = json.loads(listener.communicate(timeout=30)[0])
            assert sender.wait(30) == 0
        finally:
            kill_all(started)
        assert result["first"] >= released_at and result["sha256"] == payload_sha256()


def test_loopback_lab_refuses_to_hold(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    name = f"h{os.getpid() % 100000}"
    try:
        lab.up(1, name=name, loopback=True, timing="fast", say=lambda s: None)
        p = shoal("lab", "hold", "link", "node1", "storage", "--dir", str(lab.dir))
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert "needs the network-namespace lab" in p.stderr and "as root" in p.stderr
        assert lab.status()["nodes"]["node1"]["held"] == []
    finally:
        lab.down(name)


def test_tc_counters_parse() -> None:
    text = ("qdisc tbf 8007: root refcnt 2 rate 8bit burst 114b lat 960s \n"
            " Sent 60 bytes 1 pkt (dropped 0, overlimits 6 requeues 0) \n"
            " backlog 21196b 14p requeues 0\n")
    assert parse_backlog(text) == (21196, 14) and parse_sent(text) == (60, 1)
