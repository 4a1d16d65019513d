#!/usr/bin/env python3
"""Longer fuzzing of the NBD server than the test suite does.

Phase 1 runs the hypothesis properties of ``tests/unit/test_nbd_fuzz.py``
(parsers never raise anything but RemoteProtocolError, replies stay framed)
with ``--examples`` examples each, not derandomized.

Phase 2 attacks a live server: ``--connections`` connections, each sending a
valid handshake and requests mutated at random (flipped bytes, truncation,
random lengths, abrupt close), while a well-behaved client keeps writing and
reading back a pattern. Fails if the good client ever sees an error or wrong
data, or if the server dies.

    python bench/fuzz_nbd.py [--examples 20000] [--connections 2000] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import struct
import subprocess
import sys
import tempfile

from shoal.nbd import wire
from shoal.nbd.backend import FileBackend
from shoal.nbd.client import NBDClient
from shoal.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from shoal.nbd.server import NBDServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phase1(examples: int) -> int:
    env = dict(os.environ, NBD_FUZZ_EXAMPLES=str(examples))
    print(f"phase 1: hypothesis, {examples} examples per property")
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/unit/test_nbd_fuzz.py",
        ],
        cwd=ROOT,
        env=env,
    )


def valid_stream(rng: random.Random) -> bytes:
    name = b"disk"
    out = struct.pack(">I", 3)
    if rng.random() < 0.7:
        out += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    out += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(go)) + go
    for _ in range(rng.randint(0, 12)):
        cmd = rng.choice(
            [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, 9]
        )
        length = rng.choice([0, 1, 512, 4096, 65536, rng.randint(0, 1 << 22)])
        offset = rng.choice([0, 4096, (1 << 24) - 512, 1 << 24, rng.randint(0, 1 << 30)])
        # keep clear of the good client's region [0, 1 MiB) so its data stays checkable
        offset = max(offset, 1 << 20) if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) else offset
        out += wire.REQUEST.pack(
            REQUEST_MAGIC,
            rng.choice([0, 0, 1, 2, 8, 0xFFFF]),
            cmd,
            rng.randint(0, 99),
            offset,
            length,
        )
        if cmd == Cmd.WRITE:
            out += bytes(rng.randint(0, 255) for _ in range(min(length, 4096)))
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        if buf:
            buf[rng.randrange(len(buf))] = rng.randint(0, 255)
    if rng.random() < 0.3:
        del buf[rng.randint(0, len(buf)) :]
    return bytes(buf)


async def attacker(sock: str, rng: random.Random) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(sock)
    except OSError:
        return
    try:
        writer.write(mutate(valid_stream(rng), rng))
        await writer.drain()
        if rng.random() < 0.5:
            writer.transport.abort()  # abrupt close
            return
        async with asyncio.timeout(0.2):
            while await reader.read(65536):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


async def phase2(connections: int, seed: int) -> int:
    print(f"phase 2: {connections} hostile connections against a live server, seed {seed}")
    logging.getLogger("shoal.nbd.server").setLevel(logging.CRITICAL)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-nbd-") as work:
        image = os.path.join(work, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(1 << 24)
        sock = os.path.join(work, "s")
        server = NBDServer({"disk": FileBackend(image)})
        await server.listen_unix(sock)
        good = await NBDClient.connect(sock, "disk")
        failures = 0
        try:
            for batch in range(0, connections, 50):
                await asyncio.gather(
                    *(attacker(sock, rng) for _ in range(min(50, connections - batch)))
                )
                pattern = bytes([batch % 251]) * 4096
                await good.write(batch % 256 * 4096, pattern)
                if await good.read(batch % 256 * 4096, 4096) != pattern:
                    print(f"good client read wrong data after batch {batch}")
                    failures += 1
        finally:
            await good.close()
            await server.close()
    print("phase 2: " + ("ok" if not failures else f"{failures} failures"))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    rc = phase1(args.examples)
    rc |= asyncio.run(phase2(args.connections, args.seed))
    return rc


if __name__ == "__main__":
    sys.exit(main())
