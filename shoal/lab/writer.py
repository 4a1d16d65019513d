"""A writer that checks every block it reads back: the lab's proof that no acknowledged
write is lost while faults are injected.

    python -m shoal.lab.writer --socket SOCK --export NAME [--seconds S] [--blocks N]

It writes blocks of ``--block-size`` at random block numbers of the export (never two
writes to one block at once), each block stamped with (seed, block, generation) and a
pattern derived from them, and records a block's generation only once the write was
acknowledged. Between writes it reads acknowledged blocks back and compares; at the end
it reads *every* block and checks it holds exactly the last acknowledged generation (or
zeros if it was never written). It stops after ``--seconds`` or when ``--stop-file``
appears, and prints one JSON line::

    {"writes": n, "reads": n, "errors": n, "mismatches": n, "max_latency_ms": x,
     "p50_latency_ms": x, "first_error": "...", "checked_blocks": n,
     "slow": [[start, ms, "write"|"read"], ...]}

``slow`` lists the requests that took longer than ``--slow-ms`` (the slowest first, at
most 50), each with the wall-clock time (Unix seconds) it was sent, so that a stall can be
matched with what happened in the cluster at that moment.

``errors`` are requests the export failed (what a guest would see as an I/O error);
``mismatches`` are blocks whose content was not the last acknowledged write.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import struct
import sys
import time
from typing import Any

from shoal.nbd.client import ClientSettings, NBDClient
from shoal.nbd.errors import NBDError

_HEAD = struct.Struct("<8sQQQ")
MAGIC = b"SHOALWRT"


def block_data(seed: int, block: int, gen: int, size: int) -> bytes:
    head = _HEAD.pack(MAGIC, seed, block, gen)
    digest = hashlib.sha256(head).digest()
    body = (digest * (size // len(digest) + 1))[: size - len(head)]
    return head + body


class Writer:
    def __init__(self, client: NBDClient, *, blocks: int, block_size: int, seed: int, depth: int,
                 slow_ms: float = 50.0):
        self.client = client
        self.blocks = blocks
        self.block_size = block_size
        self.seed = seed
        self.depth = depth
        self.rng = random.Random(seed)
        self.acked: dict[int, int] = {}
        self.busy: set[int] = set()
        self.gen = 0
        self.stats: dict[str, Any] = {"writes": 0, "reads": 0, "errors": 0, "mismatches": 0, "first_error": None,
                                      "mismatch_blocks": []}
        self.latencies: list[float] = []
        self.slow_ms = slow_ms
        self.slow: list[tuple[float, float, str]] = []  # (sent at, Unix s; took ms; kind)
        #: blocks whose last write failed: their content is unknown, so not judged
        self.unknown: set[int] = set()

    def _error(self, what: str, err: Exception) -> None:
        self.stats["errors"] += 1
        if self.stats["first_error"] is None:
            self.stats["first_error"] = f"{what}: {err}"

    def _check(self, block: int, data: bytes) -> None:
        gen = self.acked.get(block)
        want = bytes(self.block_size) if gen is None else block_data(self.seed, block, gen, self.block_size)
        if data != want:
            self.stats["mismatches"] += 1
            if len(self.stats["mismatch_blocks"]) < 20:
                got = _HEAD.unpack(data[:_HEAD.size]) if data[:8] == MAGIC else None
                self.stats["mismatch_blocks"].append({
                    "block": block, "want_gen": gen, "got_gen": got[3] if got else None,
                    "got_block": got[2] if got else None, "got_seed": got[1] if got else None,
                    "zeros": data.count(0) == len(data)})

    async def _timed(self, kind: str, coro: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await coro
        finally:
            took = time.monotonic() - t0
            self.latencies.append(took)
            if took * 1000 > self.slow_ms:
                self.slow.append((time.time() - took, took * 1000, kind))

    async def _one(self) -> None:
        free = [b for b in (self.rng.randrange(self.blocks) for _ in range(8)) if b not in self.busy]
        if not free:
            await asyncio.sleep(0)
            return
        block = free[0]
        self.busy.add(block)
        try:
            if self.acked and self.rng.random() < 0.3:
                b = self.rng.choice(list(self.acked))
                if b not in self.busy:
                    self.busy.add(b)
                    try:
                        data = await self._timed("read", self.client.read(b * self.block_size, self.block_size))
                        self.stats["reads"] += 1
                        self._check(b, data)
                    except NBDError as err:
                        self._error("read", err)
                    finally:
                        self.busy.discard(b)
            self.gen += 1
            gen = self.gen
            try:
                await self._timed("write", self.client.write(block * self.block_size,
                                                    block_data(self.seed, block, gen, self.block_size)))
                self.acked[block] = gen
                self.stats["writes"] += 1
            except NBDError as err:
                self._error("write", err)
                self.acked.pop(block, None)  # its content is now unknown: do not judge it
                self.unknown.add(block)
        finally:
            self.busy.discard(block)

    async def run(self, deadline: float, stop_file: str | None) -> None:
        async def lane() -> None:
            while time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
                await self._one()

        await asyncio.gather(*(lane() for _ in range(self.depth)))
        await self.client.flush()

    async def verify_all(self) -> int:
        checked = 0
        for block in range(self.blocks):
            if block in self.unknown and block not in self.acked:
                continue
            try:
                data = await self.client.read(block * self.block_size, self.block_size)
            except NBDError as err:
                self._error("final read", err)
                continue
            self._check(block, data)
            checked += 1
        return checked


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = ClientSettings(request_timeout_s=args.request_timeout_s, connect_timeout_s=30)
    client = await NBDClient.connect(args.socket, args.export, settings)
    blocks = args.blocks or client.size // args.block_size
    w = Writer(client, blocks=blocks, block_size=args.block_size, seed=args.seed, depth=args.depth,
               slow_ms=args.slow_ms)
    t0 = time.monotonic()
    await w.run(t0 + args.seconds, args.stop_file)
    checked = await w.verify_all()
    await client.close()
    lat = sorted(w.latencies) or [0.0]
    return {**w.stats, "checked_blocks": checked, "seconds": round(time.monotonic() - t0, 2),
            "max_latency_ms": round(lat[-1] * 1000, 2), "p50_latency_ms": round(lat[len(lat) // 2] * 1000, 3),
            "slow": [[round(at, 4), round(ms, 2), kind] for at, ms, kind in sorted(w.slow, key=lambda s: -s[1])[:50]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.lab.writer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--blocks", type=int, default=0, help="blocks to use (default: the whole export)")
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--depth", type=int, default=4, help="requests in flight")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--stop-file")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--slow-ms", type=float, default=50.0,
                   help="requests slower than this are listed in the result's \"slow\" (default 50)")
    args = p.parse_args(argv)
    try:
        result = asyncio.run(main_async(args))
    except (NBDError, OSError) as err:
        print(json.dumps({"fatal": str(err)}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] and not result["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
