"""Helpers of the shared-volume system tests: volume views, files, writers in namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.agent.control import request
from shoal.lab.lab import LabState

VOLUME = "vol1"


def sock(st: LabState, node: str) -> Path:
    return Path(st.dir) / "run" / f"{node}.sock"


def nbd_socket(st: LabState, node: str) -> str:
    return str(Path(st.dir) / "run" / f"{node}-{VOLUME}.nbd")


def volume_ls(st: LabState, via: str) -> dict[str, Any]:
    vols = request(sock(st, via), "volume_ls", timeout_s=20)
    return next(v for v in vols if v["volume"] == VOLUME)


def node_view(st: LabState, node: str) -> dict[str, Any]:
    return volume_ls(st, node)["nodes"][node]


def coordinator(st: LabState, via: str | None = None) -> str | None:
    for node in [via] if via else st.nodes:
        try:
            c = volume_ls(st, node)["coordinator"]
            if c:
                return str(c)
        except Exception:  # noqa: BLE001 - a node may be down
            continue
    return None


def file_op(st: LabState, node: str, op: str, **args: Any) -> Any:
    return request(sock(st, node), "file", timeout_s=60, volume=VOLUME, fop=op, fargs=args)


def create(st: LabState, node: str, path: str, size: int) -> None:
    file_op(st, node, "create", path=path, size=size)


def ns_cmd(st: LabState, node: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", st.ns(node), *cmd]


def qemu_io(st: LabState, node: str, path: str, *cmds: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    uri = f"nbd+unix:///{path.strip('/')}?socket={nbd_socket(st, node)}"
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(ns_cmd(st, node, [*argv, uri]), capture_output=True, text=True, timeout=timeout)


@dataclass
class Writer:
    node: str
    proc: subprocess.Popen[str]
    stop_file: Path

    def stop(self, timeout: float = 180) -> dict[str, Any]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"writer on {self.node} printed no result: {out}{err}"
        return dict(json.loads(lines[-1]))


def start_writer(st: LabState, node: str, path: str, *, seed: int, blocks: int = 0, seconds: float = 600,
                 block_size: int = 65536, depth: int = 4) -> Writer:
    stop = Path(st.dir) / f"stop-writer-{node}-{seed}"
    stop.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "shoal.lab.writer", "--socket", nbd_socket(st, node), "--export", path.strip("/"),
           "--seconds", str(seconds), "--seed", str(seed), "--stop-file", str(stop),
           "--block-size", str(block_size), "--depth", str(depth)]
    if blocks:
        cmd += ["--blocks", str(blocks)]
    proc = subprocess.Popen(ns_cmd(st, node, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Writer(node, proc, stop)


def assert_clean(result: dict[str, Any], what: str) -> None:
    assert "fatal" not in result, f"{what}: {result}"
    assert result["errors"] == 0, f"{what}: the writer saw I/O errors: {result}"
    assert result["mismatches"] == 0, f"{what}: blocks did not hold the last acknowledged write: {result}"
    assert result["writes"] > 0 and result["checked_blocks"] > 0, f"{what}: nothing was written: {result}"


def events(st: LabState, node: str, kinds: set[str]) -> list[dict[str, Any]]:
    return [e for e in request(sock(st, node), "events", timeout_s=10) if e["kind"] in kinds]


def agent_pid(st: LabState, node: str) -> int:
    return int(json.loads((Path(st.dir) / "lab.json").read_text())["agents"][node])


def freeze_agent(st: LabState, node: str, frozen: bool) -> None:
    os.killpg(agent_pid(st, node), signal.SIGSTOP if frozen else signal.SIGCONT)


def others(st: LabState, node: str) -> list[str]:
    return [n for n in st.nodes if n != node]


def now() -> float:
    return time.monotonic()


def request_repair(st: LabState, node: str, kind: str) -> dict[str, Any]:
    return dict(request(sock(st, node), "volume_repair", timeout_s=600, volume=VOLUME, kind=kind))


def request_status(st: LabState, node: str) -> dict[str, Any]:
    return dict(request(sock(st, node), "status", timeout_s=10))
