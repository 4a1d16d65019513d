"""A VM's saved state in a file on a shared volume (quick migration).

QEMU 7.2 saves and restores through ``exec:`` URIs, so QEMU runs this module as its
pipe: ``write`` copies QEMU's migration stream from stdin into a volume file through
the node's NBD socket, ``read`` copies it back out to stdout for the restoring QEMU.
The file, little-endian::

    offset  size  field
    0       8     magic  b"SHOALST1"
    8       8     length u64, bytes of migration stream
    16      4080  zeros
    4096    n     the migration stream

The header is zeroed first and written last, after the stream is flushed, so a save
cut short leaves a file ``read`` refuses instead of a truncated (or an older) state.

    python -m shoal.vm.statefile write SOCKET EXPORT < stream
    python -m shoal.vm.statefile read SOCKET EXPORT > stream
"""

from __future__ import annotations

import asyncio
import struct
import sys

from shoal.nbd.client import NBDClient

MAGIC = b"SHOALST1"
HEADER = 4096
CHUNK = 1 << 20
_HEAD = struct.Struct("<8sQ")


async def write(socket: str, export: str) -> int:
    client = await NBDClient.connect(socket, export)
    try:
        # a previous save's header must not vouch for a stream this one only half replaced
        await client.write(0, bytes(HEADER))
        await client.flush()
        loop = asyncio.get_running_loop()
        stdin = sys.stdin.buffer
        offset = HEADER
        while True:
            chunk = await loop.run_in_executor(None, stdin.read, CHUNK)
            if not chunk:
                break
            if offset + len(chunk) > client.size:
                raise SystemExit(f"statefile: the state does not fit in {export} ({client.size} bytes); "
                                 "make the file larger")
            await client.write(offset, chunk)
            offset += len(chunk)
        await client.flush()
        await client.write(0, _HEAD.pack(MAGIC, offset - HEADER).ljust(HEADER, b"\0"))
        await client.flush()
        return offset - HEADER
    finally:
        await client.close()


async def read(socket: str, export: str) -> int:
    client = await NBDClient.connect(socket, export)
    try:
        magic, length = _HEAD.unpack(await client.read(0, _HEAD.size))
        if magic != MAGIC:
            raise SystemExit(f"statefile: {export} holds no complete saved state")
        out = sys.stdout.buffer
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            out.write(await client.read(HEADER + done, n))
            done += n
        out.flush()
        return length
    finally:
        await client.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("write", "read"):
        print("usage: python -m shoal.vm.statefile write|read SOCKET EXPORT", file=sys.stderr)
        return 2
    fn = write if argv[0] == "write" else read
    asyncio.run(fn(argv[1], argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
