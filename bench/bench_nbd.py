#!/usr/bin/env python3
"""Compare shoal's NBD server with qemu-nbd serving the same raw image.

Both servers listen on unix sockets and are driven by ``qemu-img bench`` with
identical parameters, alternately, in the same run:

    1 MiB sequential write, depth 8     1 MiB sequential read, depth 8
    4 KiB write, depth 16               4 KiB read, depth 16

Each case runs ``--repeat`` times per server; the best run counts (least
disturbed by other load). Ratio = qemu-nbd time / shoal time, so >= 1.0 means
shoal is at least as fast.

    python bench/bench_nbd.py [--size 1G] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

CASES = [
    # name, write?, block size, depth, count
    ("1M seq write d8", True, "1M", 8, 3000),
    ("1M seq read  d8", False, "1M", 8, 3000),
    ("4K write     d16", True, "4k", 16, 150000),
    ("4K read      d16", False, "4k", 16, 150000),
]


def wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server for {path} did not start")
        time.sleep(0.05)
    time.sleep(0.1)


def bench(uri: str, write: bool, size: str, depth: int, count: int) -> float:
    cmd = [
        "qemu-img",
        "bench",
        "-f",
        "raw",
        "-t",
        "none",
        "-s",
        size,
        "-d",
        str(depth),
        "-c",
        str(count),
    ]
    if write:
        cmd.append("-w")
    # without -S each request follows the previous one (sequential), wrapping at the end
    out = subprocess.run(cmd + [uri], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not match:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply op counts")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing; install the qemu-utils package")
    work = tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir)
    image = os.path.join(work, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, args.size], check=True)
    image_size = os.path.getsize(image)
    # allocate every block up front so neither server pays for allocation
    with open(image, "r+b") as f:
        chunk = b"\x5a" * (1 << 20)
        for _ in range(image_size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    ours_sock = os.path.join(work, "shoal.sock")
    qemu_sock = os.path.join(work, "qemu.sock")
    ours = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "nbd",
            "serve",
            "--file",
            image,
            "--name",
            "disk",
            "--socket",
            ours_sock,
        ]
    )
    qemu = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "raw",
            "-t",
            "-e",
            "64",
            "--cache=writeback",
            "-x",
            "disk",
            "-k",
            qemu_sock,
            image,
        ]
    )
    try:
        wait_socket(ours_sock, ours)
        wait_socket(qemu_sock, qemu)
        uris = {
            "shoal": f"nbd+unix:///disk?socket={ours_sock}",
            "qemu-nbd": f"nbd+unix:///disk?socket={qemu_sock}",
        }
        print(f"image {image} ({image_size} bytes), best of {args.repeat}, qemu-img bench -t none")
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(f"{'case':18} {'qemu-nbd s':>11} {'shoal s':>9} {'ratio':>7}")
        ratios = []
        for name, write, size, depth, count in CASES:
            count = max(1, int(count * args.scale))
            best = {"shoal": float("inf"), "qemu-nbd": float("inf")}
            for _ in range(args.repeat):
                for server in ("qemu-nbd", "shoal"):
                    t = bench(uris[server], write, size, depth, count)
                    best[server] = min(best[server], t)
            ratio = best["qemu-nbd"] / best["shoal"]
            ratios.append(ratio)
            print(
                f"{name:18} {best['qemu-nbd']:11.3f} {best['shoal']:9.3f} {ratio:6.2f}x   ({count} ops)"
            )
        print("ratios (qemu-nbd time / shoal time): " + ", ".join(f"{r:.2f}" for r in ratios))
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    finally:
        for proc in (ours, qemu):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
