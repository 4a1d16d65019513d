"""Geometry and superblock (docs/FORMAT.md §1, §2).

:func:`plan` decides where everything lives for a volume of a given size;
:class:`Superblock` records it, encoded in one checksummed block written at the start
and at the end of the volume.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, replace

from shoal.volume.errors import NotAVolume, VolumeCorrupt

BLOCK = 4096
KiB = 1 << 10
MiB = 1 << 20
MAGIC = b"SHOALVOL"
VERSION = 1
LEASE_OFFSET = 64 * KiB
LEASE_SECTORS = 66
JOURNAL_OFFSET = 1 * MiB
MIN_VOLUME_SIZE = 64 * MiB
MIN_UNIT = 64 * KiB
MAX_UNIT = 64 * MiB
DEFAULT_UNIT = 1 * MiB
CKPT_BYTES_PER_UNIT = 48

# magic, version, block, uuid, name, size, unit, lease_sectors, lease_off, journal_off,
# journal_size, ckpt_a, ckpt_b, ckpt_size, data_off, unit_count, backup_off, created
_SB = struct.Struct("<8sII16s64sQIIQQQQQQQQQQ")
assert _SB.size == 192


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Superblock:
    uuid: bytes
    name: str
    volume_size: int
    unit_size: int
    lease_offset: int
    journal_offset: int
    journal_size: int
    ckpt_a_offset: int
    ckpt_b_offset: int
    ckpt_size: int
    data_offset: int
    unit_count: int
    backup_offset: int
    created_ns: int

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def unit_offset(self, unit: int) -> int:
        """Byte offset on the LUN of allocation unit ``unit``."""
        return self.data_offset + unit * self.unit_size

    def encode(self) -> bytes:
        head = _SB.pack(
            MAGIC, VERSION, BLOCK, self.uuid, self.name.encode()[:64], self.volume_size,
            self.unit_size, LEASE_SECTORS, self.lease_offset, self.journal_offset,
            self.journal_size, self.ckpt_a_offset, self.ckpt_b_offset, self.ckpt_size,
            self.data_offset, self.unit_count, self.backup_offset, self.created_ns,
        )
        body = head + bytes(BLOCK - 4 - len(head))
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def decode(cls, block: bytes, where: str) -> Superblock:
        """Parse one superblock copy; ``where`` names it in errors."""
        if block[:8] != MAGIC:
            raise NotAVolume(f"the {where} has no shoal signature")
        if zlib.crc32(block[: BLOCK - 4]) != struct.unpack_from("<I", block, BLOCK - 4)[0]:
            raise VolumeCorrupt(f"the {where} is damaged (bad checksum)", what=where)
        (_, version, block_size, uid, name, size, unit, sectors, lease_off, j_off, j_size,
         a_off, b_off, c_size, d_off, units, backup, created) = _SB.unpack_from(block)
        if version != VERSION:
            raise NotAVolume(f"the {where} is format version {version}; this shoal reads version {VERSION}")
        if block_size != BLOCK or sectors != LEASE_SECTORS:
            raise VolumeCorrupt(f"the {where} has impossible geometry", what=where)
        sb = cls(uid, name.rstrip(b"\0").decode(errors="replace"), size, unit, lease_off, j_off,
                 j_size, a_off, b_off, c_size, d_off, units, backup, created)
        sb.check_geometry(where)
        return sb

    def check_geometry(self, where: str) -> None:
        ok = (
            MIN_UNIT <= self.unit_size <= MAX_UNIT
            and self.unit_size & (self.unit_size - 1) == 0
            and self.lease_offset + LEASE_SECTORS * BLOCK <= self.journal_offset
            and self.journal_offset + self.journal_size <= self.ckpt_a_offset
            and self.ckpt_a_offset + self.ckpt_size <= self.ckpt_b_offset
            and self.ckpt_b_offset + self.ckpt_size <= self.data_offset
            and self.data_offset + self.unit_count * self.unit_size <= self.backup_offset
            and self.backup_offset + BLOCK == self.volume_size
        )
        if not ok:
            raise VolumeCorrupt(f"the {where} describes an impossible layout", what=where)

    def renamed(self, name: str) -> Superblock:
        return replace(self, name=name)


def plan(volume_size: int, unit_size: int = DEFAULT_UNIT, name: str = "", created_ns: int = 0) -> Superblock:
    """Lay out a new volume (FORMAT.md §1). Raises ``ValueError`` with a user sentence."""
    if unit_size < MIN_UNIT or unit_size > MAX_UNIT or unit_size & (unit_size - 1):
        raise ValueError(
            f"unit size {unit_size} is not allowed; use a power of two from 64K to 64M (default 1M)"
        )
    if volume_size < MIN_VOLUME_SIZE:
        raise ValueError(f"a volume needs at least 64 MiB; {volume_size} bytes is too small")
    if len(name.encode()) > 64:
        raise ValueError("a volume name may have at most 64 bytes")
    volume_size = volume_size // BLOCK * BLOCK
    journal_size = min(max(_round_up(volume_size // 256, MiB), 4 * MiB), 256 * MiB)
    approx_units = volume_size // unit_size
    ckpt_size = _round_up(MiB + CKPT_BYTES_PER_UNIT * approx_units, MiB)
    ckpt_a = JOURNAL_OFFSET + journal_size
    ckpt_b = ckpt_a + ckpt_size
    data_offset = _round_up(ckpt_b + ckpt_size, unit_size)
    backup = volume_size - BLOCK
    unit_count = (backup - data_offset) // unit_size
    if unit_count < 1:
        raise ValueError("the volume is too small for its metadata with this unit size; make it larger")
    return Superblock(
        uuid=uuidlib.uuid4().bytes, name=name, volume_size=volume_size, unit_size=unit_size,
        lease_offset=LEASE_OFFSET, journal_offset=JOURNAL_OFFSET, journal_size=journal_size,
        ckpt_a_offset=ckpt_a, ckpt_b_offset=ckpt_b, ckpt_size=ckpt_size, data_offset=data_offset,
        unit_count=unit_count, backup_offset=backup, created_ns=created_ns,
    )
