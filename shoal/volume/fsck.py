"""Check and repair a volume (like chkdsk on CSV). Needs exclusive access.

What is checked, in order, each finding a :class:`Problem` naming what is damaged:

1. both superblocks (checksum, agreement);
2. the lease sectors (checksums);
3. both checkpoint slots (checksums);
4. the journal (a damaged record in the middle of the log);
5. the namespace (every inode reachable from ``/`` exactly once, no loops, parents
   are directories);
6. extents (inside the data area, inside the file's size, no unit claimed twice);
7. the allocation bitmap against the extents (leaked units, used units marked free).

Repair works on the metadata in memory and then writes it back whole: a fresh
checkpoint in both slots, a zeroed journal (so no old record can ever replay), both
superblocks. Unreachable inodes go to ``/lost+found``; of two files claiming a unit the
first (lowest inode) keeps it; extents out of bounds or past the end are dropped.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from shoal.volume import checkpoint, journal, ops
from shoal.volume.device import Device
from shoal.volume.errors import NotAVolume, VolumeCorrupt, VolumeError
from shoal.volume.layout import BLOCK, LEASE_SECTORS, Superblock
from shoal.volume.lease import (
    FREE,
    CoordinatorLease,
    LeaseArea,
    LivenessSlot,
    OfflineLease,
    in_use_error,
)
from shoal.volume.meta import ROOT, Inode, Metadata

CLEAN, PROBLEMS, FAILED = 0, 1, 2
LOST_FOUND = "lost+found"


@dataclass
class Problem:
    what: str  # the damaged structure: "primary superblock", "journal", "/vm/disk0"...
    message: str
    fixed: bool = False

    def to_json(self) -> dict[str, object]:
        return {"what": self.what, "message": self.message, "fixed": self.fixed}


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False
    error: str | None = None
    files: int = 0
    used_units: int = 0

    @property
    def exit_code(self) -> int:
        if self.error:
            return FAILED
        return PROBLEMS if self.problems else CLEAN

    def add(self, what: str, message: str) -> None:
        self.problems.append(Problem(what, message))

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path, "clean": not self.problems and not self.error,
            "repaired": self.repaired, "error": self.error, "files": self.files,
            "used_units": self.used_units, "problems": [p.to_json() for p in self.problems],
        }


def fsck(path: str, *, repair: bool = False) -> Report:
    report = Report(path)
    try:
        device = Device(path, writable=repair)
    except VolumeError as err:
        report.error = str(err)
        return report
    try:
        _fsck(device, report, repair=repair, online_epoch=None)
    finally:
        device.close()
    return report


def fsck_online(device: Device, *, repair: bool, epoch: int) -> Report:
    """fsck by the coordinator in maintenance mode: it holds the lease (``epoch``) and has
    closed its open volume, so nothing else writes metadata; the lease area is left alone."""
    report = Report(device.path)
    _fsck(device, report, repair=repair, online_epoch=epoch)
    return report


def _fsck(device: Device, report: Report, *, repair: bool, online_epoch: int | None) -> None:
    lease: OfflineLease | None = None
    try:
        sb = _check_superblocks(device, report)
        if sb is None:
            return
        if online_epoch is None:
            area = LeaseArea(device, sb)
            _check_leases(area, report, repair=repair)
            current = area.read_lease() if not _lease_damaged(report) else CoordinatorLease()
            if repair:
                lease = OfflineLease(area, sb.name)
                lease.acquire()
            elif current.owner != FREE and area.owner_alive(current):
                raise in_use_error(current, sb.name)
        meta, last_seq = _load(device, sb, report)
        _check_namespace(meta, report, repair=repair)
        owner = _check_extents(meta, report, repair=repair)
        _check_bitmap(meta, owner, report, repair=repair)
        report.files = sum(1 for n in meta.inodes.values() if not n.is_dir)
        report.used_units = meta.used_units
        if repair and report.problems:
            if online_epoch is not None:
                epoch = online_epoch
            else:
                epoch = lease.lease.epoch if lease and lease.lease else 0
            _write_back(device, sb, meta, last_seq, epoch)
            for p in report.problems:
                p.fixed = True
            report.repaired = True
    except VolumeCorrupt as err:
        report.error = f"{err}; the volume could not be checked further"
    finally:
        if lease:
            lease.release()


# ---- superblocks and leases ------------------------------------------------------------

def _check_superblocks(device: Device, report: Report) -> Superblock | None:
    copies: dict[str, Superblock] = {}
    errors: dict[str, VolumeError] = {}
    if device.size < 2 * BLOCK:
        report.error = f"{device.path} is not a shoal volume (it is only {device.size} bytes long)"
        return None
    for where, offset in (("primary superblock", 0), ("backup superblock", device.size - BLOCK)):
        try:
            copies[where] = Superblock.decode(device.pread(offset, BLOCK), where)
        except (NotAVolume, VolumeCorrupt) as err:
            errors[where] = err
    if not copies:
        if all(isinstance(e, NotAVolume) for e in errors.values()):
            report.error = f"{device.path} is not a shoal volume"
        else:
            report.error = f"both superblocks of {device.path} are damaged; nothing can be checked"
        return None
    for where, problem in errors.items():
        report.add(where, str(problem))
    sb = copies.get("primary superblock") or copies["backup superblock"]
    if len(copies) == 2 and copies["primary superblock"] != copies["backup superblock"]:
        report.add("backup superblock", "the backup superblock differs from the primary")
    return sb


def _check_leases(area: LeaseArea, report: Report, *, repair: bool) -> None:
    for n in range(LEASE_SECTORS):
        try:
            if n == 0:
                area.read_lease()
            else:
                area.read_slot(n)
        except VolumeCorrupt as err:
            report.add(err.what, str(err))
            if repair:
                # a damaged lease sector reads as free after repair; the epoch never goes back
                if n == 0:
                    area.write_lease(CoordinatorLease(epoch=int(time.time())))
                else:
                    area.write_slot(LivenessSlot(node_id=n))


def _lease_damaged(report: Report) -> bool:
    return any(p.what == "coordinator lease" for p in report.problems)


# ---- metadata ------------------------------------------------------------------------

def _load(device: Device, sb: Superblock, report: Report) -> tuple[Metadata, int]:
    slots = []
    for label, offset in (("A", sb.ckpt_a_offset), ("B", sb.ckpt_b_offset)):
        got = checkpoint.read_slot(device, sb, offset)
        if got is None:
            report.add(f"checkpoint slot {label}", f"metadata checkpoint slot {label} is damaged (bad checksum)")
        else:
            slots.append(got)
    if slots:
        head, body = max(slots, key=lambda s: s[0].seq)
        meta = checkpoint.decode(head, body, sb)
    else:
        head, meta = _salvage_checkpoint(device, sb, report)
    result = journal.scan(device, sb, head.seq, min_epoch=head.epoch)
    if result.damage:
        report.add("journal", result.damage)
    seq = head.seq
    for rec in result.records:
        try:
            for op in rec.ops:
                meta.release(meta.apply(op))
        except VolumeCorrupt as err:
            report.add("journal", f"journal record {rec.seq} does not fit the metadata ({err}); it and later records were dropped")
            break
        seq = rec.seq
    if result.damage:
        # records past the damage are lost; start numbering past every record on disk
        seq = max(seq, _max_seq(device, sb))
    return meta, seq


def _max_seq(device: Device, sb: Superblock) -> int:
    best = 0
    pos = 0
    while pos < sb.journal_size:
        kind, rec = journal._read_record(device, sb, pos)
        if kind == "ok" and rec is not None:
            best = max(best, rec.seq)
        pos += BLOCK
    return best


def _salvage_checkpoint(device: Device, sb: Superblock, report: Report) -> tuple[checkpoint.CheckpointHeader, Metadata]:
    """Both slots fail their checksums: decode whichever still parses, else start empty."""
    for offset in (sb.ckpt_a_offset, sb.ckpt_b_offset):
        raw = device.pread(offset, BLOCK)
        try:
            _, _, seq, epoch, next_ino, body_len, count, used, crc = checkpoint._HEAD.unpack_from(raw)
            if body_len > sb.ckpt_size - BLOCK:
                continue
            head = checkpoint.CheckpointHeader(seq, epoch, next_ino, body_len, count, used, crc)
            meta = checkpoint.decode(head, device.pread(offset + BLOCK, body_len), sb)
            report.add("checkpoint", "both checkpoint slots are damaged; salvaged what still parses")
            return head, meta
        except (VolumeCorrupt, struct.error):
            continue
    report.add("checkpoint", "both checkpoint slots are damaged beyond salvage; the namespace starts empty")
    return checkpoint.CheckpointHeader(0, 0, ROOT + 1, 0, 1, 0, 0), Metadata(sb.unit_size, sb.unit_count)


def _check_namespace(meta: Metadata, report: Report, *, repair: bool) -> None:
    inodes = meta.inodes
    for node in inodes.values():
        node.children = {}
    for node in sorted(inodes.values(), key=lambda n: n.ino):
        if node.kind not in (ops.FILE, ops.DIRECTORY):
            report.add(f"inode {node.ino}", f"inode {node.ino} has unknown kind {node.kind}")
            node.kind = ops.FILE
        if node.ino == ROOT:
            continue
        parent = inodes.get(node.parent)
        if parent is None or not parent.is_dir or node.name in parent.children or not node.name:
            continue  # left unreachable; found below
        parent.children[node.name] = node.ino
    reachable = {ROOT}
    stack = [ROOT]
    while stack:
        for ino in inodes[stack.pop()].children.values():
            if ino not in reachable:
                reachable.add(ino)
                stack.append(ino)
    lost = sorted(set(inodes) - reachable)
    if not lost:
        return
    for ino in lost:
        node = inodes[ino]
        report.add(f"inode {ino}", f"{node.name or '(unnamed)'} (inode {ino}) is not reachable from / "
                   "(dangling entry, duplicate name or directory loop)")
    if repair:
        root = inodes[ROOT]
        lf_ino = root.children.get(LOST_FOUND)
        if lf_ino is None or not inodes[lf_ino].is_dir:
            lf_ino = meta.next_ino
            meta.next_ino += 1
            name = LOST_FOUND if LOST_FOUND not in root.children else f"{LOST_FOUND}.{lf_ino}"
            inodes[lf_ino] = Inode(lf_ino, ROOT, name, ops.DIRECTORY, mtime_ns=time.time_ns())
            root.children[name] = lf_ino
        lf = inodes[lf_ino]
        for ino in lost:
            node = inodes[ino]
            node.parent, node.name = lf_ino, f"{node.name or 'inode'}.{ino}"
            lf.children[node.name] = ino


def _check_extents(meta: Metadata, report: Report, *, repair: bool) -> dict[int, int]:
    """Check every file's extents; returns unit -> owning inode (after repairs)."""
    owner: dict[int, int] = {}
    for node in sorted(meta.inodes.values(), key=lambda n: n.ino):
        if node.is_dir:
            if len(node.extents):
                report.add(f"inode {node.ino}", f"directory inode {node.ino} has data extents")
                if repair:
                    node.extents.unmap(0, node.extents.end_unit())
            continue
        limit = -(-node.size // meta.unit_size)
        drop: list[tuple[int, int]] = []
        for fu, unit, count in list(node.extents.runs()):
            name = f"{node.name} (inode {node.ino})"
            if unit + count > meta.unit_count:
                report.add(f"inode {node.ino}", f"{name} has an extent outside the data area (units {unit}-{unit + count - 1})")
                drop.append((fu, count))
                continue
            if fu + count > limit:
                report.add(f"inode {node.ino}", f"{name} has extents past its end (file units {max(fu, limit)}-{fu + count - 1})")
                drop.append((max(fu, limit), fu + count - max(fu, limit)))
            for k in range(count):
                u = unit + k
                if u in owner:
                    report.add(f"inode {node.ino}", f"unit {u} is cross-linked: claimed by inode {owner[u]} and {name}")
                    drop.append((fu + k, 1))
                else:
                    owner[u] = node.ino
        if repair:
            for fu, count in drop:
                for u, n in node.extents.unmap(fu, count):
                    for x in range(u, u + n):
                        if owner.get(x) == node.ino:
                            del owner[x]
    return owner


def _check_bitmap(meta: Metadata, owner: dict[int, int], report: Report, *, repair: bool) -> None:
    derived = bytearray(meta.unit_count)
    for u in owner:
        derived[u] = 1
    if derived == meta.bitmap:
        return
    leaked = [u for u in range(meta.unit_count) if meta.bitmap[u] and not derived[u]]
    unmarked = [u for u in range(meta.unit_count) if derived[u] and not meta.bitmap[u]]
    if leaked:
        report.add("allocation bitmap", f"{len(leaked)} units are marked used but belong to no file (leaked), first {leaked[0]}")
    if unmarked:
        report.add("allocation bitmap", f"{len(unmarked)} units belong to files but are marked free, first {unmarked[0]}")
    if repair:
        meta.bitmap = derived
        meta.used_units = len(owner)


def _write_back(device: Device, sb: Superblock, meta: Metadata, seq: int, epoch: int) -> None:
    image = checkpoint.encode(meta, sb.uuid, seq, epoch)
    checkpoint.write_slots(device, sb, image)
    device.write_zeroes(sb.journal_offset, sb.journal_size)
    device.pwrite(sb.backup_offset, sb.encode())
    device.pwrite(0, sb.encode())
    device.flush()
