"""Checkpoint slots: a whole image of the metadata (docs/FORMAT.md §5).

Written to slot A, flushed, then to slot B, flushed; only then may the journal restart.
A reader takes the valid slot with the higher sequence number, so a crash at any
instant leaves at least one complete checkpoint whose journal is still intact.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from shoal.volume.device import Device
from shoal.volume.errors import VolumeCorrupt, VolumeFull
from shoal.volume.layout import BLOCK, Superblock
from shoal.volume.meta import ROOT, Inode, Metadata

MAGIC = b"SHOALCKP"
_HEAD = struct.Struct("<8s16sQQQQQQI")
_HEAD_CRC = struct.Struct("<I")
_INODE = struct.Struct("<QQBBBBQQI")
_EXTENT = struct.Struct("<QQI")


@dataclass(frozen=True)
class CheckpointHeader:
    seq: int
    epoch: int
    next_ino: int
    body_len: int
    inode_count: int
    used_units: int
    body_crc: int


def encode(meta: Metadata, uuid: bytes, seq: int, epoch: int) -> bytes:
    """Header block followed by the body, ready to write at a slot's start."""
    parts: list[bytes] = [bytes(meta.bitmap)]
    for ino in sorted(meta.inodes):
        node = meta.inodes[ino]
        name = node.name.encode()
        runs = list(node.extents.runs())
        parts.append(_INODE.pack(node.ino, node.parent, node.kind, node.flags, len(name), 0,
                                 node.size, node.mtime_ns, len(runs)))
        parts.append(name)
        parts.extend(_EXTENT.pack(*r) for r in runs)
    body = b"".join(parts)
    head = _HEAD.pack(MAGIC, uuid, seq, epoch, meta.next_ino, len(body), len(meta.inodes),
                      meta.used_units, zlib.crc32(body))
    head += _HEAD_CRC.pack(zlib.crc32(head))
    return head + bytes(BLOCK - len(head)) + body


def write_slots(device: Device, sb: Superblock, image: bytes, *, first: str = "A") -> None:
    """Both slots, ``first`` first (the one that is *not* the newest valid copy)."""
    if len(image) > sb.ckpt_size:
        raise VolumeFull(
            "the metadata no longer fits its area on the volume; delete files or defragment "
            "to reduce fragmentation"
        )
    order = (sb.ckpt_a_offset, sb.ckpt_b_offset) if first == "A" else (sb.ckpt_b_offset, sb.ckpt_a_offset)
    for offset in order:
        device.pwrite(offset, image)
        device.flush()


def read_header(device: Device, offset: int, uuid: bytes) -> CheckpointHeader | None:
    block = device.pread(offset, BLOCK)
    if block[:8] != MAGIC or block[8:24] != uuid:
        return None
    if zlib.crc32(block[: _HEAD.size]) != _HEAD_CRC.unpack_from(block, _HEAD.size)[0]:
        return None
    _, _, seq, epoch, next_ino, body_len, count, used, body_crc = _HEAD.unpack_from(block)
    return CheckpointHeader(seq, epoch, next_ino, body_len, count, used, body_crc)


def read_slot(device: Device, sb: Superblock, offset: int) -> tuple[CheckpointHeader, bytes] | None:
    """Return (header, body) if the slot at ``offset`` is whole, else None."""
    head = read_header(device, offset, sb.uuid)
    if head is None or head.body_len > sb.ckpt_size - BLOCK:
        return None
    body = device.pread(offset + BLOCK, head.body_len)
    if zlib.crc32(body) != head.body_crc:
        return None
    return head, body


def decode(head: CheckpointHeader, body: bytes, sb: Superblock) -> Metadata:
    meta = Metadata(sb.unit_size, sb.unit_count)
    try:
        meta.bitmap = bytearray(body[: sb.unit_count])
        if len(meta.bitmap) != sb.unit_count:
            raise ValueError("short bitmap")
        meta.used_units = sb.unit_count - meta.bitmap.count(0)
        meta.inodes = {}
        pos = sb.unit_count
        for _ in range(head.inode_count):
            ino, parent, kind, flags, nlen, _, size, mtime, n = _INODE.unpack_from(body, pos)
            pos += _INODE.size
            name = body[pos : pos + nlen].decode()
            pos += nlen
            node = Inode(ino, parent, name, kind, flags, size, mtime)
            for _ in range(n):
                fu, u, c = _EXTENT.unpack_from(body, pos)
                pos += _EXTENT.size
                node.extents.map(fu, u, c)
            meta.inodes[ino] = node
        if pos != len(body) or ROOT not in meta.inodes:
            raise ValueError("length mismatch")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise VolumeCorrupt("the metadata checkpoint is malformed", what="checkpoint") from err
    for node in meta.inodes.values():
        if node.ino != ROOT and node.parent in meta.inodes:
            meta.inodes[node.parent].children[node.name] = node.ino
    meta.next_ino = max(head.next_ino, max(meta.inodes) + 1)
    meta.image_bytes = len(body)
    return meta
