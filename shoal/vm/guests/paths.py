"""Where the built test guests live and how to boot them.

The guests directory is ``/var/cache/shoal/guests`` unless ``SHOAL_GUESTS_DIR`` names
another. ``python -m shoal.vm.guests build`` (run by ``./run setup``) fills it::

    memguest.elf          memory guest: multiboot kernel, no initrd
    diskguest-vmlinuz     disk guest: Debian's cloud kernel
    diskguest-initrd.gz   disk guest: busybox initramfs
    manifest.json         what was built from what (written last: no manifest, no build)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.vm.errors import GuestError

DEFAULT_GUESTS_DIR = Path("/var/cache/shoal/guests")
GUESTS_DIR_ENV = "SHOAL_GUESTS_DIR"

MEMORY_KERNEL = "memguest.elf"
DISK_KERNEL = "diskguest-vmlinuz"
DISK_INITRD = "diskguest-initrd.gz"
MANIFEST = "manifest.json"

GuestKind = Literal["memory", "disk"]
KINDS: tuple[GuestKind, ...] = ("memory", "disk")

NOT_BUILT = "the test guests are not built; run './run setup' or 'python -m shoal.vm.guests build'"


@dataclass(frozen=True)
class GuestImage:
    """How to boot one guest: ``-kernel kernel [-initrd initrd] -append append``, with at
    least ``memory_mib`` of RAM. The memory guest's append is ``rate=<MiB/s>``; the disk
    guest's carries ``console=ttyS0`` and ``shoal.blocks=<N>``."""

    kind: GuestKind
    kernel: Path
    initrd: Path | None
    append: str
    memory_mib: int


# rate=16: busy enough to show dirty-page tracking, slow enough for a default
# migration to converge.
MEMORY_APPEND = "rate=16"
DISK_APPEND = "console=ttyS0 quiet shoal.blocks=256"


def guests_dir() -> Path:
    override = os.environ.get(GUESTS_DIR_ENV, "").strip()
    return Path(override) if override else DEFAULT_GUESTS_DIR


def locate(kind: str, directory: Path | None = None) -> GuestImage:
    """The built guest ``kind`` ("memory" or "disk"); GuestError when it is not built."""
    root = directory if directory is not None else guests_dir()
    if kind == "memory":
        image = GuestImage("memory", root / MEMORY_KERNEL, None, MEMORY_APPEND, 64)
    elif kind == "disk":
        image = GuestImage("disk", root / DISK_KERNEL, root / DISK_INITRD, DISK_APPEND, 128)
    else:
        raise GuestError(f"there is no test guest called {kind!r}; the guests are: memory, disk")
    needed = [root / MANIFEST, image.kernel] + ([image.initrd] if image.initrd else [])
    if not all(path.is_file() for path in needed):
        raise GuestError(f"{NOT_BUILT} (looked in {root})")
    return image
