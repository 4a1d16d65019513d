"""Formatting a LUN as a shoal volume (docs/FORMAT.md §1).

The superblocks are written last, backup before primary, so an interrupted format
never leaves something that looks like a volume. Targets that hold data are refused
unless forced: any known signature, or (for files) non-zero bytes near the start.
"""

from __future__ import annotations

import os
import stat
import time

from shoal.errors import UsageError
from shoal.volume import checkpoint
from shoal.volume.device import Device
from shoal.volume.errors import RefuseToFormat
from shoal.volume.layout import BLOCK, LEASE_SECTORS, MIN_VOLUME_SIZE, Superblock, plan
from shoal.volume.meta import Metadata

#: (offset, bytes, what it means) — a target holding any of these is refused without force
SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"SHOALVOL", "another shoal volume"),
    (0, b"QFI\xfb", "a qcow2 image"),
    (0, b"XFSB", "an XFS filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS container"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (510, b"\x55\xaa", "a partition table or boot sector"),
    (512, b"EFI PART", "a GPT partition table"),
    (536, b"LVM2 001", "an LVM physical volume"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (32769, b"CD001", "an ISO 9660 filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
]
_PROBE = 1 << 20


def detect_data(device: Device) -> str | None:
    """What the target holds, as words for a sentence, or None if it looks empty."""
    head = device.pread(0, min(_PROBE, device.size))
    for offset, magic, what in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    if device.size >= BLOCK and device.pread(device.size - BLOCK, 8) == b"SHOALVOL":
        return "another shoal volume"
    if head.count(0) != len(head):
        return "data (non-zero bytes in its first MiB)"
    return None


def format_volume(path: str, size: int | None = None, *, unit_size: int = 1 << 20, name: str = "",
                  force: bool = False) -> Superblock:
    """Format ``path`` (a file, created sparse if missing, or a block device)."""
    exists = os.path.exists(path)
    if exists:
        st = os.stat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{path} is neither a regular file nor a block device")
        is_block = stat.S_ISBLK(st.st_mode)
    else:
        if size is None:
            raise UsageError(f"{path} does not exist; give --size to create it as a sparse file")
        is_block = False
        try:
            with open(path, "xb"):
                pass
        except OSError as err:
            raise UsageError(f"cannot create {path}: {err.strerror}") from err
    device = Device(path, writable=True)
    try:
        if exists and device.size and not force:
            what = detect_data(device)
            if what:
                raise RefuseToFormat(f"{path} holds {what}; formatting would destroy it. Use --force if you mean it")
        if is_block:
            if size is not None and size != device.size // BLOCK * BLOCK and size != device.size:
                raise UsageError(
                    f"a block device is formatted whole: {path} has {device.size} bytes; omit --size"
                )
            size = device.size
        assert size is not None
        if size < MIN_VOLUME_SIZE:
            raise UsageError(f"a volume needs at least 64M; {size} bytes is too small")
        try:
            sb = plan(size, unit_size, name, time.time_ns())
        except ValueError as err:
            raise UsageError(str(err)) from err
        if not is_block:
            try:
                os.ftruncate(device.fd, sb.volume_size)
            except OSError as err:
                raise UsageError(
                    f"cannot make {path} {sb.volume_size} bytes long ({err.strerror}); the filesystem "
                    "holding it does not allow files that large: use a block device, or a file on xfs or tmpfs"
                ) from err
            device.size = sb.volume_size
        _write_new(device, sb)
        return sb
    finally:
        device.close()


def _write_new(device: Device, sb: Superblock) -> None:
    device.write_zeroes(0, BLOCK)
    device.write_zeroes(sb.backup_offset, BLOCK)
    device.flush()
    device.write_zeroes(sb.lease_offset, LEASE_SECTORS * BLOCK)
    device.write_zeroes(sb.journal_offset, BLOCK)
    image = checkpoint.encode(Metadata(sb.unit_size, sb.unit_count), sb.uuid, 0, 0)
    checkpoint.write_slots(device, sb, image)
    device.pwrite(sb.backup_offset, sb.encode())
    device.flush()
    device.pwrite(0, sb.encode())
    device.flush()
