"""Bounded load generators for the lab: ``python -m shoal.lab.load KIND …``.

Every generator stops after ``seconds`` (and the network ones after a byte cap),
so a test that dies cannot leave a runaway load behind.

    cpu SECONDS                       one busy loop
    sink ADDRESS PORT SECONDS         accept TCP streams, discard them
    send ADDRESS PORT SECONDS         stream zeros to a sink as fast as possible
    disk PATH SECONDS                 write and fsync 4 MiB blocks (file kept ≤ 256 MiB)
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

MAX_BYTES = 1 << 40
CHUNK = 1 << 20


def cpu(seconds: float) -> None:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(10000):
            n += 1


def sink(address: str, port: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    srv = socket.create_server((address, port), reuse_port=True)
    srv.settimeout(0.5)

    def drain(c: socket.socket) -> None:
        c.settimeout(1)
        while time.monotonic() < end:
            try:
                if not c.recv(CHUNK):
                    break
            except (TimeoutError, OSError):
                if time.monotonic() >= end:
                    break
        c.close()

    while time.monotonic() < end:
        try:
            conn, _ = srv.accept()
        except (TimeoutError, OSError):
            continue
        threading.Thread(target=drain, args=(conn,), daemon=True).start()
    srv.close()


def send(address: str, port: int, seconds: float) -> int:
    end = time.monotonic() + seconds
    buf = bytes(CHUNK)
    sent = 0
    while time.monotonic() < end and sent < MAX_BYTES:
        try:
            with socket.create_connection((address, port), timeout=2) as s:
                s.settimeout(1)
                while time.monotonic() < end and sent < MAX_BYTES:
                    sent += s.send(buf)
        except OSError:
            time.sleep(0.2)
    return sent


def disk(path: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    block = os.urandom(4 << 20)
    with open(path, "wb") as f:
        while time.monotonic() < end:
            if f.tell() >= 256 << 20:
                f.seek(0)
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
    os.unlink(path)


def main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "cpu":
        cpu(float(rest[0]))
    elif kind == "sink":
        sink(rest[0], int(rest[1]), float(rest[2]))
    elif kind == "send":
        n = send(rest[0], int(rest[1]), float(rest[2]))
        print(f"sent {n >> 20} MiB")
    elif kind == "disk":
        disk(rest[0], float(rest[1]))
    else:
        print(f"unknown load {kind!r}; use cpu, sink, send or disk", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
