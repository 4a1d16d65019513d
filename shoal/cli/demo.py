"""``shoal demo``: a narrated tour for a newcomer, on real files, that cleans up after itself.

Today it shows the shared volume: format, import a sparse VM disk, look at it, export it
back byte-identical, check it. Later capabilities extend it to the whole cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from typing import Any

from shoal.util.sizes import format_size
from shoal.volume import fsck, transfer
from shoal.volume.format import format_volume
from shoal.volume.volume import Volume


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="a narrated tour of shoal on this machine (cleans up after itself)")
    p.add_argument("--dir", help="work here and keep the files (default: a temporary directory, removed)")
    p.set_defaults(handler=cmd_demo)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _make_disk(path: str, size: int) -> int:
    """A sparse 'VM disk' with data in three places; returns bytes of data."""
    with open(path, "wb") as f:
        f.truncate(size)
        data = 0
        for offset, length in ((0, 1 << 20), (size // 2, 3 << 20), (size - (2 << 20), 2 << 20)):
            f.seek(offset)
            f.write(hashlib.sha256(str(offset).encode()).digest() * (length // 32))
            data += length
    return data


def cmd_demo(args: argparse.Namespace) -> int:
    work = args.dir or tempfile.mkdtemp(prefix="shoal-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        return _run(work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
            print(f"\nremoved {work}")


def _run(work: str) -> int:
    lun = os.path.join(work, "lun.img")
    disk = os.path.join(work, "vm-disk.raw")
    back = os.path.join(work, "vm-disk.exported.raw")
    _say("A shared volume lives on a LUN. Here the LUN is a sparse image file.")
    sb = format_volume(lun, 1 << 30, name="vol1", force=True)
    print(f"formatted {lun}: {format_size(sb.volume_size)}, {sb.unit_count} allocation units of "
          f"{format_size(sb.unit_size)}, journal {format_size(sb.journal_size)}")

    _say("A VM disk is a sparse file: 256 MiB, of which only 6 MiB hold data.")
    data = _make_disk(disk, 256 << 20)
    print(f"{disk}: {format_size(os.path.getsize(disk))} with {format_size(data)} of data")

    _say("Import it into the volume. Holes stay holes: only units with data are allocated.")
    with Volume.open(lun) as vol:
        vol.mkdir("/vms/web1", parents=True)
        transfer.import_file(vol, disk, "/vms/web1/disk0.raw")
        st = vol.stat("/vms/web1/disk0.raw")
        print(f"/vms/web1/disk0.raw: size {format_size(st.size)}, allocated {format_size(st.allocated)} "
              f"in {st.extents} extents")
        for offset, lun_offset, length in vol.open_file(st.path).extent_map():
            print(f"  file bytes {offset:>10} .. {offset + length:>10}  ->  LUN byte {lun_offset}")
        print("every node of a cluster reads and writes these LUN offsets directly; "
              "only the coordinator changes the map")

    _say("Export it back and compare: byte-identical, and still sparse.")
    with Volume.open(lun, writable=False) as vol:
        transfer.export_file(vol, "/vms/web1/disk0.raw", back)
    same = _sha256(disk) == _sha256(back)
    used = os.stat(back).st_blocks * 512
    print(f"sha256 identical: {same}; exported file occupies {format_size(used)} on the host disk")

    _say("Check the volume, as chkdsk would: checksums, namespace, extents, allocation.")
    report = fsck.fsck(lun)
    print("clean" if report.exit_code == 0 else f"problems: {[p.message for p in report.problems]}")

    _say("Done. Next: run `./run test` for the whole suite, or see README.md for the commands.")
    return 0 if same and report.exit_code == 0 else 1
