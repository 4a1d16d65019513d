"""The shared volume's API: namespace, allocation and file I/O on one LUN.

One writer at a time (the coordinator, or an offline tool holding the lease) opens a
volume with :meth:`Volume.open`, which reads the superblock, loads the newest
checkpoint and replays the journal; nothing is kept outside the volume, so another host
can do the same and carry on.

Every metadata change is a transaction: validate, apply to memory and queue the
operations under ``_lock`` (so log order is apply order), then wait for the journal's
group commit outside it. Units a transaction frees become allocatable only when it is
durable (``_pending_free``); units being filled but not yet mapped are ``_reserved`` and
left out of checkpoints.

Lock order: a file's I/O lock (shared for reads and writes, exclusive while its units
are freed or moved) → that file's allocation lock → ``Volume._lock`` → the journal's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shoal.volume import checkpoint, journal, ops
from shoal.volume.device import Device
from shoal.volume.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotAVolume,
    NotFound,
    VolumeCorrupt,
    VolumeError,
    VolumeFull,
)
from shoal.volume.layout import BLOCK, Superblock
from shoal.volume.lease import FREE, LeaseArea, OfflineLease, in_use_error
from shoal.volume.meta import ROOT, Inode, Metadata

#: operations per transaction when a large change is split (keeps records small)
MAX_OPS_PER_TXN = 512
#: checkpoint space kept back from growth so removals can always be checkpointed
_METADATA_RESERVE = 64 << 10


def _both(first: Callable[[], None], second: Callable[[], None] | None) -> Callable[[], None]:
    if second is None:
        return first

    def guard() -> None:
        first()
        second()

    return guard


def _now_ns() -> int:
    return time.time_ns()


def split_path(path: str) -> list[str]:
    """``/a/b`` -> ``["a", "b"]``; validates every name."""
    if not path.startswith("/"):
        raise InvalidName(f"volume path {path!r} must start with /", path=path)
    names = [n for n in path.split("/") if n]
    for name in names:
        check_name(name, path)
    return names


def check_name(name: str, path: str = "") -> None:
    raw = name.encode()
    if name in (".", "..") or "\0" in name or "/" in name or not 0 < len(raw) <= 255:
        raise InvalidName(f"{name!r} is not a valid name in {path or 'the volume'}: use 1-255 bytes without / or NUL", path=path)


@dataclass(frozen=True)
class Stat:
    path: str
    ino: int
    kind: str  # "file" | "directory"
    size: int
    allocated: int
    mtime_ns: int
    preallocated: bool
    extents: int

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


class RWLock:
    """Many readers or one writer; writers wait for readers to leave."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


def read_superblock(device: Device) -> tuple[Superblock, list[str]]:
    """Primary superblock, or the backup with a warning naming the damage."""
    warnings: list[str] = []
    if device.size < 2 * BLOCK:
        raise NotAVolume(f"{device.path} is not a shoal volume (it is only {device.size} bytes long)")
    try:
        primary = device.pread(0, BLOCK)
    except VolumeError:
        primary = bytes(BLOCK)
    try:
        sb = Superblock.decode(primary, "primary superblock")
    except (NotAVolume, VolumeCorrupt) as err:
        backup_at = device.size - BLOCK
        try:
            sb = Superblock.decode(device.pread(backup_at, BLOCK), "backup superblock")
        except (NotAVolume, VolumeCorrupt):
            if isinstance(err, NotAVolume):
                raise NotAVolume(f"{device.path} is not a shoal volume (no valid superblock at its start or end)") from err
            raise VolumeCorrupt(
                f"both superblocks of {device.path} are damaged; the volume cannot be read", what="superblock"
            ) from err
        warnings.append(f"{err}; using the backup superblock at byte {backup_at} (run: shoal volume fsck --repair)")
        return sb, warnings
    if sb.volume_size > device.size:
        raise VolumeCorrupt(f"{device.path} is smaller than the volume its superblock describes", what="superblock")
    return sb, warnings


class Volume:
    """An open volume. Thread-safe. Use :meth:`open`; close with :meth:`close`."""

    def __init__(self, device: Device, sb: Superblock, meta: Metadata, *, writable: bool, epoch: int,
                 journal_start: int, next_seq: int, warnings: list[str],
                 lease: OfflineLease | None = None, guard: Callable[[], None] | None = None,
                 ckpt_first: str = "A"):
        self.device = device
        self.sb = sb
        self.meta = meta
        self.writable = writable
        self.epoch = epoch
        self.warnings = warnings
        self._lease = lease
        self._lock = threading.RLock()
        self._journal = journal.Journal(device, sb, start=journal_start, next_seq=next_seq, epoch=epoch, guard=guard)
        self._pending_free: list[tuple[int, list[tuple[int, int]]]] = []
        self._reserved: dict[int, int] = {}
        self._io_locks: dict[int, RWLock] = {}
        self._alloc_locks: dict[int, threading.Lock] = {}
        self._closed = False
        self._broken: BaseException | None = None
        self._ckpt_first = ckpt_first

    # ---- opening and closing ---------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = True, offline: bool = True, epoch: int | None = None,
             guard: Callable[[], None] | None = None) -> Volume:
        """Open and replay. ``offline`` (the default, for tools) honours the coordinator
        lease: refuse if a live owner holds it, and hold it while writing."""
        return cls.open_device(Device(path, writable=writable), writable=writable, offline=offline,
                               epoch=epoch, guard=guard)

    @classmethod
    def open_device(cls, device: Device, *, writable: bool = True, offline: bool = True,
                    epoch: int | None = None, guard: Callable[[], None] | None = None,
                    clean_seq: int | None = None) -> Volume:
        """:meth:`open` on a device the caller opened (the agent's LUN over NBD); the
        volume closes it. ``clean_seq``: see :func:`load_metadata` (a planned hand-over:
        neither the journal scan nor a fresh checkpoint is needed)."""
        try:
            sb, warnings = read_superblock(device)
            lease: OfflineLease | None = None
            area = LeaseArea(device, sb)
            if offline:
                if writable:
                    lease = OfflineLease(area, sb.name)
                    lease.acquire()
                    assert lease.lease is not None
                    epoch = lease.lease.epoch
                    guard = _both(lease.guard, guard)
                else:
                    current = area.read_lease()
                    if current.owner != FREE and area.owner_alive(current):
                        raise in_use_error(current, sb.name)
            try:
                meta, start, next_seq, more = load_metadata(device, sb, clean_seq=clean_seq)
                warnings.extend(more)
                vol = cls(device, sb, meta, writable=writable, epoch=epoch or 0, journal_start=start,
                          next_seq=next_seq, warnings=warnings, lease=lease, guard=guard,
                          ckpt_first=meta.loaded_from_other)
                if writable and (clean_seq is None or next_seq != clean_seq + 1):
                    vol.checkpoint()
                return vol
            except BaseException:
                if lease:
                    lease.release()
                raise
        except BaseException:
            device.close()
            raise

    def close(self, *, checkpoint: bool = True) -> None:
        """Close; a writable volume writes a checkpoint first, or with
        ``checkpoint=False`` only makes sure every journal record is durable (the next
        opener replays them; ``last_seq`` is then its ``clean_seq``)."""
        if self._closed:
            return
        try:
            if self.writable and not self._broken:
                if checkpoint:
                    self.checkpoint()
                else:
                    self._journal.flush_all()
        finally:
            self._closed = True
            if self._lease:
                self._lease.release()
            self.device.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions ----------------------------------------------------------------

    @property
    def journal_bytes(self) -> int:
        """Journal written since the last checkpoint (what a replay would read)."""
        return self._journal.used

    @property
    def last_seq(self) -> int:
        """Seq of the last journal record (or checkpoint) written; after :meth:`close`, the
        ``clean_seq`` a successor may open with."""
        return self._journal.next_seq - 1

    @property
    def failure(self) -> BaseException | None:
        """Why this open volume stopped taking changes (memory may be ahead of the disk:
        reopen it to replay), or None."""
        return self._broken or self._journal._failed

    def _check_writable(self) -> None:
        if self._closed:
            raise VolumeError("the volume is closed")
        if not self.writable:
            raise VolumeError("the volume is open read-only")

    def _log(self, batch: list[ops.Op], *, data_first: bool = False) -> int:
        """Apply and queue ``batch``; caller holds ``_lock``. Returns the ticket."""
        if self._broken:
            raise VolumeError(f"the volume stopped accepting changes after an internal error ({self._broken}); reopen it")
        size = sum(len(ops.encode(o)) for o in batch)
        if size + BLOCK > self.sb.journal_size // 4:
            raise VolumeError("one change is too large for the journal; split it")
        grow_new, grow_other = self.meta.image_growth(batch)
        reserve = _METADATA_RESERVE if grow_new else 0
        if self.meta.image_bytes + grow_new + grow_other + BLOCK + reserve > self.sb.ckpt_size:
            raise VolumeFull(
                f"the metadata area of volume {self.sb.name or self.sb.uuid_str} is full; remove files "
                "or defragment (removals always fit)"
            )
        if self._journal.used + size + BLOCK > self.sb.journal_size // 2:
            self._checkpoint_locked()
        freed: list[tuple[int, int]] = []
        try:
            for op in batch:
                freed.extend(self.meta.apply(op))
        except BaseException as err:
            # memory now differs from the journal: never checkpoint this state
            self._broken = err
            raise
        ticket = self._journal.submit(batch, data_first=data_first)
        if freed:
            self._pending_free.append((ticket, freed))
        return ticket

    def _wait(self, ticket: int) -> None:
        self._journal.wait(ticket)
        if self._pending_free:
            with self._lock:
                self._release_durable()

    def _release_durable(self) -> None:
        durable = self._journal._durable
        keep = []
        for ticket, runs in self._pending_free:
            if ticket <= durable:
                self.meta.release(runs)
            else:
                keep.append((ticket, runs))
        self._pending_free = keep

    def transact(self, batch: list[ops.Op]) -> None:
        """Log a validated batch and wait until it is durable."""
        with self._lock:
            ticket = self._log(batch)
        self._wait(ticket)

    def checkpoint(self) -> None:
        self._check_writable()
        if self._broken is not None:  # memory differs from the journal: never save it
            raise VolumeError(f"the volume stopped taking changes ({self._broken}); reopen it")
        with self._lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        self._journal.flush_all()
        self._release_durable()
        saved = []
        for unit, count in self._reserved.items():
            saved.append((unit, bytes(self.meta.bitmap[unit : unit + count])))
            self.meta.bitmap[unit : unit + count] = bytes(count)
        try:
            image = checkpoint.encode(self.meta, self.sb.uuid, self._journal.next_seq - 1, self.epoch)
        finally:
            for unit, old in saved:
                self.meta.bitmap[unit : unit + len(old)] = old
        if self._journal.guard:
            self._journal.guard()
        checkpoint.write_slots(self.device, self.sb, image, first=self._ckpt_first)
        self._ckpt_first = "A"
        self._journal.restart(self._journal.next_seq)

    # ---- namespace -------------------------------------------------------------------

    def _lookup(self, path: str) -> Inode:
        node = self.meta.inodes[ROOT]
        for name in split_path(path):
            if not node.is_dir:
                raise NotADirectory(f"{self.meta.path_of(node.ino)} is not a directory (in {path})", path=path)
            child = self.meta.child(node, name)
            if child is None:
                raise NotFound(f"{path} does not exist on volume {self.sb.name or self.sb.uuid_str}", path=path)
            node = child
        return node

    def _parent_and_name(self, path: str) -> tuple[Inode, str]:
        names = split_path(path)
        if not names:
            raise InvalidName("the root directory cannot be created, removed or renamed", path=path)
        parent = self._lookup("/" + "/".join(names[:-1]))
        if not parent.is_dir:
            raise NotADirectory(f"{self.meta.path_of(parent.ino)} is not a directory", path=path)
        return parent, names[-1]

    def _claim_name(self, path: str) -> tuple[Inode, str, int]:
        """Parent, name and a fresh inode number for a new entry; caller holds ``_lock``."""
        parent, name = self._parent_and_name(path)
        if name in parent.children:
            raise AlreadyExists(f"{path} already exists; remove it first or choose another name", path=path)
        ino = self.meta.next_ino
        self.meta.next_ino += 1
        return parent, name, ino

    def _stat(self, node: Inode) -> Stat:
        return Stat(
            path=self.meta.path_of(node.ino), ino=node.ino,
            kind="directory" if node.is_dir else "file", size=node.size,
            allocated=node.extents.mapped_units() * self.sb.unit_size, mtime_ns=node.mtime_ns,
            preallocated=bool(node.flags & ops.PREALLOCATED), extents=len(node.extents),
        )

    def exists(self, path: str) -> bool:
        try:
            with self._lock:
                self._lookup(path)
            return True
        except NotFound:
            return False

    def stat(self, path: str) -> Stat:
        with self._lock:
            return self._stat(self._lookup(path))

    def listdir(self, path: str = "/") -> list[Stat]:
        with self._lock:
            node = self._lookup(path)
            if not node.is_dir:
                return [self._stat(node)]
            return [self._stat(self.meta.inodes[i]) for _, i in sorted(node.children.items())]

    def walk_files(self) -> Iterator[tuple[str, Stat]]:
        """Every regular file, depth first, in name order (a snapshot)."""
        with self._lock:
            out = []
            stack = [ROOT]
            while stack:
                node = self.meta.inodes[stack.pop()]
                for _, ino in sorted(node.children.items(), reverse=True):
                    child = self.meta.inodes[ino]
                    if child.is_dir:
                        stack.append(ino)
                    else:
                        st = self._stat(child)
                        out.append((st.path, st))
        out.sort()
        return iter(out)

    def mkdir(self, path: str, *, parents: bool = False) -> Stat:
        self._check_writable()
        if parents:
            names = split_path(path)
            for i in range(1, len(names)):
                sub = "/" + "/".join(names[:i])
                if not self.exists(sub):
                    self.mkdir(sub)
            if self.exists(path) and self.stat(path).kind == "directory":
                return self.stat(path)
        with self._lock:
            parent, name, ino = self._claim_name(path)
            ticket = self._log([ops.Create(ino, parent.ino, ops.DIRECTORY, 0, _now_ns(), name)])
        self._wait(ticket)
        return self.stat(path)

    def create(self, path: str, size: int = 0, *, preallocate: bool = False, exist_ok: bool = False) -> VolumeFile:
        """Create a file of ``size`` bytes: sparse, or thick (every unit allocated and zeroed)."""
        self._check_writable()
        if size < 0:
            raise VolumeError("a file size cannot be negative")
        with self._lock:
            parent, name = self._parent_and_name(path)
            existing = self.meta.child(parent, name)
            if existing is not None:
                if existing.is_dir:
                    raise IsADirectory(f"{path} is a directory", path=path)
                if not exist_ok:
                    raise AlreadyExists(f"{path} already exists; remove it first or choose another name", path=path)
                ino = existing.ino
        if existing is None:
            return self._create_new(path, size, preallocate)
        f = VolumeFile(self, ino)
        if size != f.size:
            self.resize(path, size)
        return f

    def _create_new(self, path: str, size: int, preallocate: bool) -> VolumeFile:
        """CREATE, its units (thick) and SET_SIZE in one transaction: a crash or a full
        volume leaves the file whole or absent, never empty."""
        U = self.sb.unit_size
        runs: list[tuple[int, int]] = []
        if preallocate and size:
            with self._lock:
                runs = self._reserve(-(-size // U), None)
            if len(runs) + 2 > MAX_OPS_PER_TXN:
                # too fragmented for one record: an empty thick file, then a chunked resize
                self._unreserve(runs, free=True)
                f = self._create_new(path, 0, preallocate)
                f.resize(size)
                return f
        try:
            for unit, n in runs:
                self.device.write_zeroes(self.sb.unit_offset(unit), n * U)
            with self._lock:
                parent, name, ino = self._claim_name(path)
                now = _now_ns()
                flags = ops.PREALLOCATED if preallocate else 0
                batch: list[ops.Op] = [ops.Create(ino, parent.ino, ops.FILE, flags, now, name)]
                pos = 0
                for unit, n in runs:
                    batch.append(ops.Map(ino, pos, unit, n))
                    pos += n
                if size:
                    batch.append(ops.SetSize(ino, size, now))
                ticket = self._log(batch, data_first=bool(runs))
                for unit, _ in runs:
                    self._reserved.pop(unit, None)
        except BaseException:
            self._unreserve(runs, free=True)
            raise
        self._wait(ticket)
        return VolumeFile(self, ino)

    def open_file(self, path: str) -> VolumeFile:
        with self._lock:
            node = self._lookup(path)
            if node.is_dir:
                raise IsADirectory(f"{path} is a directory, not a file", path=path)
            return VolumeFile(self, node.ino)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._check_writable()
        with self._lock:
            node = self._lookup(path)
        if node.is_dir and node.children:
            if not recursive:
                raise DirectoryNotEmpty(f"{path} is a directory that is not empty; use -r to remove it with its contents", path=path)
            for name in sorted(node.children):
                self.remove(path.rstrip("/") + "/" + name, recursive=True)
        io = self._io_lock(node.ino)
        io.acquire_exclusive()
        try:
            with self._lock:
                parent, name = self._parent_and_name(path)
                if parent.children.get(name) != node.ino:
                    raise NotFound(f"{path} does not exist", path=path)
                if node.children:
                    raise DirectoryNotEmpty(f"{path} is not empty (something was created in it meanwhile)", path=path)
                ticket = self._log([ops.Remove(parent.ino, name)])
            self._wait(ticket)
        finally:
            io.release_exclusive()

    def rename(self, src: str, dst: str) -> None:
        self._check_writable()
        with self._lock:
            node = self._lookup(src)
            sparent, sname = self._parent_and_name(src)
            dparent, dname = self._parent_and_name(dst)
            if dname in dparent.children:
                raise AlreadyExists(f"{dst} already exists; remove it first", path=dst)
            walk = dparent.ino
            while node.is_dir:
                if walk == node.ino:
                    raise InvalidName(f"cannot move {src} into itself ({dst})", path=dst)
                if walk == ROOT:
                    break
                walk = self.meta.inodes[walk].parent
            ticket = self._log([ops.Rename(sparent.ino, dparent.ino, _now_ns(), sname, dname)])
        self._wait(ticket)

    def resize(self, path: str, size: int) -> None:
        self._check_writable()
        f = self.open_file(path)
        f.resize(size)

    # ---- allocation helpers used by files, fsck and defrag ----------------------------

    def _io_lock(self, ino: int) -> RWLock:
        with self._lock:
            return self._io_locks.setdefault(ino, RWLock())

    def _alloc_lock(self, ino: int) -> threading.Lock:
        with self._lock:
            return self._alloc_locks.setdefault(ino, threading.Lock())

    def _reserve(self, count: int, hint: int | None, zeroed: set[int] | None = None) -> list[tuple[int, int]]:
        """Mark ``count`` units used but unmapped; caller holds ``_lock``. Units that
        came from the pool of zeroed units are added to ``zeroed`` when given; a single
        unit is then taken from the pool first (its lowest unit)."""
        pool = self.meta.zeroed
        if zeroed is not None and count == 1 and hint is None and pool:
            unit = min(pool)
            self.meta.mark_used(unit, 1)
            self._reserved[unit] = 1
            zeroed.add(unit)
            return [(unit, 1)]
        runs = self.meta.find_free(count, hint)
        if runs is None:
            free = self.meta.unit_count - self.meta.used_units
            raise VolumeFull(
                f"volume {self.sb.name or self.sb.uuid_str} is full: {count} units needed, {free} free; "
                "delete or trim files, or use a larger volume"
            )
        for unit, n in runs:
            if zeroed is not None and pool:
                zeroed.update(u for u in range(unit, unit + n) if u in pool)
            self.meta.mark_used(unit, n)
            self._reserved[unit] = n
        return runs

    def prezero(self, want: int) -> int:
        """Zero and flush up to ``want`` free units ahead of the allocation cursor and
        add them to the pool (``meta.zeroed``), so that :meth:`VolumeFile.allocate`
        can map them with one journal write and no zeroing. The units stay reserved
        while they are zeroed; at most a quarter of the free units are taken. Returns
        how many units were added."""
        self._check_writable()
        with self._lock:
            free = self.meta.unit_count - self.meta.used_units
            units = self.meta.free_ahead(min(want, free // 4), self.meta.zeroed)
            for u in units:
                self.meta.mark_used(u, 1)
                self._reserved[u] = 1
        runs = _runs(sorted(units))
        try:
            if runs and self._journal.guard:
                self._journal.guard()  # a deposed coordinator zeroes nothing
            for unit, n in runs:
                self.device.write_zeroes(self.sb.unit_offset(unit), n * self.sb.unit_size)
            if runs:
                self.device.flush()
        except BaseException:
            self._unreserve([(u, 1) for u in units], free=True)
            raise
        with self._lock:
            self._unreserve([(u, 1) for u in units], free=True)
            self.meta.zeroed.update(units)
        return len(units)

    def _unreserve(self, runs: list[tuple[int, int]], *, free: bool) -> None:
        with self._lock:
            for unit, n in runs:
                self._reserved.pop(unit, None)
                if free:
                    self.meta.mark_free(unit, n)

    def info(self) -> dict[str, object]:
        with self._lock:
            files = sum(1 for n in self.meta.inodes.values() if not n.is_dir)
            dirs = len(self.meta.inodes) - files
            used = self.meta.used_units
        sb = self.sb
        return {
            "name": sb.name, "uuid": sb.uuid_str, "size": sb.volume_size, "unit_size": sb.unit_size,
            "units": sb.unit_count, "used_units": used, "free_units": sb.unit_count - used,
            "used_bytes": used * sb.unit_size, "free_bytes": (sb.unit_count - used) * sb.unit_size,
            "files": files, "directories": dirs, "journal_size": sb.journal_size,
            "data_offset": sb.data_offset, "epoch": self.epoch,
        }


class VolumeFile:
    """One file of an open volume, addressed by inode (survives renames)."""

    def __init__(self, vol: Volume, ino: int):
        self.vol = vol
        self.ino = ino
        self.unit_size = vol.sb.unit_size

    def _node(self) -> Inode:
        try:
            return self.vol.meta.inodes[self.ino]
        except KeyError:
            raise NotFound("the file was removed while open") from None

    @property
    def size(self) -> int:
        with self.vol._lock:
            return self._node().size

    @property
    def preallocated(self) -> bool:
        with self.vol._lock:
            return bool(self._node().flags & ops.PREALLOCATED)

    def _check_range(self, offset: int, length: int, size: int) -> None:
        if offset < 0 or length < 0 or offset + length > size:
            raise VolumeError(
                f"range {offset}+{length} is outside the file (size {size}); resize the file first"
            )

    def _segments(self, offset: int, length: int) -> list[tuple[int, int | None, int]]:
        """Byte segments (file offset, LUN offset or None for a hole, length); holds ``_lock``."""
        U = self.unit_size
        node = self._node()
        first = offset // U
        last = (offset + length - 1) // U
        out = []
        for fu, unit, count in node.extents.segments(first, last - first + 1):
            s = max(fu * U, offset)
            e = min((fu + count) * U, offset + length)
            lun = None if unit is None else self.vol.sb.unit_offset(unit) + (s - fu * U)
            out.append((s, lun, e - s))
        return out

    def extent_map(self) -> list[tuple[int, int, int]]:
        """(file offset, LUN offset, length) of every mapped run: what a node caches."""
        U = self.unit_size
        with self.vol._lock:
            return [(fu * U, self.vol.sb.unit_offset(u), n * U) for fu, u, n in self._node().extents.runs()]

    def pread(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        io = self.vol._io_lock(self.ino)
        io.acquire_shared()
        try:
            with self.vol._lock:
                self._check_range(offset, length, self._node().size)
                segs = self._segments(offset, length)
            if len(segs) == 1 and segs[0][1] is not None:
                return self.vol.device.pread(segs[0][1], length)
            parts = [bytes(n) if lun is None else self.vol.device.pread(lun, n) for _, lun, n in segs]
            return b"".join(parts)
        finally:
            io.release_shared()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, durable: bool = True,
               sync: bool = False) -> None:
        """Write ``data`` at ``offset``; holes in the range are allocated first.

        ``durable=False`` returns before new allocations are on stable storage (as a disk
        without FUA does); :meth:`flush` makes them durable. Bulk copies use it.
        ``sync=True``: the data itself is durable too when this returns (a FUA write
        where the range is mapped; records that decide something, like a VM's owner).
        """
        self.vol._check_writable()
        length = len(data)
        if length == 0:
            return
        view = memoryview(data)
        io = self.vol._io_lock(self.ino)
        io.acquire_shared()
        try:
            with self.vol._lock:
                self._check_range(offset, length, self._node().size)
                segs = self._segments(offset, length)
            if all(lun is not None for _, lun, _ in segs):
                self._write_mapped(segs, offset, view, sync=sync)
                return
            with self.vol._alloc_lock(self.ino):
                self._write_allocating(offset, view, durable or sync)
        finally:
            io.release_shared()

    def _write_mapped(self, segs: list[tuple[int, int | None, int]], offset: int, view: memoryview, *,
                      sync: bool = False) -> None:
        write = self.vol.device.pwrite_durable if sync else self.vol.device.pwrite
        for s, lun, n in segs:
            assert lun is not None
            write(lun, view[s - offset : s - offset + n])

    def _write_allocating(self, offset: int, view: memoryview, durable: bool) -> None:
        """Allocate the holes of the range, fill them (data or zeros), then map them."""
        U = self.unit_size
        vol = self.vol
        length = len(view)
        first, last = offset // U, (offset + length - 1) // U
        with vol._lock:
            node = self._node()
            holes = [(fu, n) for fu, u, n in node.extents.segments(first, last - first + 1) if u is None]
            new: list[tuple[int, int, int]] = []  # (file unit, unit, count)
            try:
                for fu, n in holes:
                    before = node.extents.segments(fu - 1, 1)[0][1] if fu > 0 else None
                    pos = fu
                    for unit, cnt in vol._reserve(n, None if before is None else before + 1):
                        new.append((pos, unit, cnt))
                        pos += cnt
            except VolumeFull:
                vol._unreserve([(u, c) for _, u, c in new], free=True)
                raise
            segs = self._segments(offset, length)
        reserved = [(u, c) for _, u, c in new]
        try:
            # zero the parts of new units the data does not cover (no stale data)
            for fu, unit, cnt in new:
                ustart, uend = fu * U, (fu + cnt) * U
                base = vol.sb.unit_offset(unit)
                if ustart < offset:
                    vol.device.write_zeroes(base, min(offset, uend) - ustart)
                if uend > offset + length:
                    zs = max(offset + length, ustart)
                    vol.device.write_zeroes(base + (zs - ustart), uend - zs)
            # data: mapped parts where they are, the rest into the fresh runs (a hole may
            # have been filled by several runs, so split by run, not by hole)
            for s, lun, n in segs:
                if lun is not None:
                    vol.device.pwrite(lun, view[s - offset : s - offset + n])
            for fu, unit, cnt in new:
                s = max(fu * U, offset)
                e = min((fu + cnt) * U, offset + length)
                if e > s:
                    vol.device.pwrite(vol.sb.unit_offset(unit) + (s - fu * U), view[s - offset : e - offset])
            batch: list[ops.Op] = [ops.Map(self.ino, fu, unit, cnt) for fu, unit, cnt in new]
            with vol._lock:
                ticket = vol._log(batch, data_first=True)
                for unit, _ in reserved:
                    vol._reserved.pop(unit, None)
        except BaseException:
            vol._unreserve(reserved, free=True)
            raise
        if durable:
            vol._wait(ticket)

    def _free_units(self, first: int, count: int) -> None:
        """Unmap whole file units ``[first, first+count)`` (exclusive I/O lock held)."""
        if count <= 0:
            return
        with self.vol._lock:
            if self._node().extents.is_hole(first, count):
                return
            ticket = self.vol._log([ops.Unmap(self.ino, first, count)])
        self.vol._wait(ticket)

    def write_zeroes(self, offset: int, length: int, *, free: bool = True) -> None:
        """Make the range read as zeros; whole units in it become holes (thick files
        keep them, and so does ``free=False``: zeros are written in place)."""
        self.vol._check_writable()
        if length == 0:
            return
        U = self.unit_size
        io = self.vol._io_lock(self.ino)
        io.acquire_exclusive()
        try:
            with self.vol._lock:
                self._check_range(offset, length, self._node().size)
                thick = bool(self._node().flags & ops.PREALLOCATED)
                segs = self._segments(offset, length)
            first, end = -(-offset // U), (offset + length) // U
            if not thick and free and end > first:
                self._free_units(first, end - first)
                with self.vol._lock:
                    segs = self._segments(offset, length)
            for _, lun, n in segs:
                if lun is not None:
                    self.vol.device.write_zeroes(lun, n)
        finally:
            io.release_exclusive()

    def discard(self, offset: int, length: int) -> None:
        """Free the whole units inside the range (TRIM); partial units are left alone."""
        self.vol._check_writable()
        U = self.unit_size
        with self.vol._lock:
            self._check_range(offset, length, self._node().size)
            if self._node().flags & ops.PREALLOCATED:
                return
        first, end = -(-offset // U), (offset + length) // U
        if end <= first:
            return
        io = self.vol._io_lock(self.ino)
        io.acquire_exclusive()
        try:
            self._free_units(first, end - first)
        finally:
            io.release_exclusive()

    def resize(self, size: int) -> None:
        """Grow (zeroing dead bytes past the old end first) or shrink (freeing units)."""
        vol = self.vol
        vol._check_writable()
        if size < 0:
            raise VolumeError("a file size cannot be negative")
        U = self.unit_size
        io = vol._io_lock(self.ino)
        io.acquire_exclusive()
        try:
            with vol._lock:
                node = self._node()
                old = node.size
                thick = bool(node.flags & ops.PREALLOCATED)
                tail = node.extents.segments(old // U, 1)[0][1] if size > old and old % U else None
            if tail is not None:
                vol.device.write_zeroes(vol.sb.unit_offset(tail) + old % U, U - old % U)
            new: list[tuple[int, int, int]] = []
            if thick and size > old:
                new = self._reserve_range(-(-old // U), -(-size // U))
                for _, unit, cnt in new:
                    vol.device.write_zeroes(vol.sb.unit_offset(unit), cnt * U)
            batch: list[ops.Op] = [ops.Map(self.ino, fu, u, c) for fu, u, c in new]
            batch.append(ops.SetSize(self.ino, size, _now_ns()))
            reserved = [(u, c) for _, u, c in new]
            data_first = bool(new) or tail is not None
            try:
                tickets = []
                # a thick grow over many runs is logged in chunks; each chunk's units leave
                # _reserved under the same lock hold as its record is queued, so a checkpoint
                # between chunks sees them as mapped, never as free
                for i in range(0, len(batch), MAX_OPS_PER_TXN):
                    chunk = batch[i : i + MAX_OPS_PER_TXN]
                    with vol._lock:
                        tickets.append(vol._log(chunk, data_first=data_first))
                        for op in chunk:
                            if isinstance(op, ops.Map):
                                vol._reserved.pop(op.unit, None)
            except BaseException:
                with vol._lock:
                    still = [(u, c) for u, c in reserved if u in vol._reserved]
                vol._unreserve(still, free=True)
                raise
            vol._wait(tickets[-1])
        finally:
            io.release_exclusive()

    def allocate(self, offset: int, length: int) -> int:
        """Map the holes of the range to zeroed units without writing data; returns how
        many units were mapped. For a node that writes straight to the LUN: the whole new
        units are zeroed and flushed before the record that maps them (no stale data)."""
        vol = self.vol
        vol._check_writable()
        if length == 0:
            return 0
        U = self.unit_size
        io = vol._io_lock(self.ino)
        io.acquire_shared()
        try:
            with vol._alloc_lock(self.ino):
                with vol._lock:
                    self._check_range(offset, length, self._node().size)
                zeroed: set[int] = set()  # units from the pool: durable zeros already
                new = self._reserve_range(offset // U, -(-(offset + length) // U), zeroed)
                try:
                    dirty = [run for _, unit, cnt in new for run in _runs(
                        [u for u in range(unit, unit + cnt) if u not in zeroed])]
                    for unit, cnt in dirty:
                        vol.device.write_zeroes(vol.sb.unit_offset(unit), cnt * U)
                    tickets = []
                    for i in range(0, len(new), MAX_OPS_PER_TXN):
                        chunk = new[i : i + MAX_OPS_PER_TXN]
                        with vol._lock:
                            tickets.append(vol._log([ops.Map(self.ino, fu, u, c) for fu, u, c in chunk],
                                                    data_first=bool(dirty)))
                            for _, unit, _ in chunk:
                                vol._reserved.pop(unit, None)
                except BaseException:
                    with vol._lock:
                        still = [(u, c) for _, u, c in new if u in vol._reserved]
                    vol._unreserve(still, free=True)
                    raise
                if tickets:
                    vol._wait(tickets[-1])
                return sum(c for _, _, c in new)
        finally:
            io.release_shared()

    def _reserve_range(self, first: int, end: int, zeroed: set[int] | None = None) -> list[tuple[int, int, int]]:
        """Reserve units for the holes of file units ``[first, end)`` (see Volume._reserve)."""
        new: list[tuple[int, int, int]] = []
        with self.vol._lock:
            holes = [(fu, n) for fu, u, n in self._node().extents.segments(first, end - first) if u is None] if end > first else []
            try:
                for fu, n in holes:
                    pos = fu
                    for unit, cnt in self.vol._reserve(n, None, zeroed):
                        new.append((pos, unit, cnt))
                        pos += cnt
            except VolumeFull:
                self.vol._unreserve([(u, c) for _, u, c in new], free=True)
                raise
        return new

    def flush(self) -> None:
        """Make every write and allocation so far durable."""
        self.vol.device.flush()
        self.vol._journal.flush_all()
        if self.vol._pending_free:
            with self.vol._lock:
                self.vol._release_durable()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs covering the range, adjacent equals merged."""
        if length == 0:
            return []
        with self.vol._lock:
            self._check_range(offset, length, self._node().size)
            segs = self._segments(offset, length)
        out: list[tuple[int, int, bool]] = []
        for s, lun, n in segs:
            hole = lun is None
            if out and out[-1][2] == hole:
                o, ln, _ = out[-1]
                out[-1] = (o, ln + n, hole)
            else:
                out.append((s, n, hole))
        return out


def load_metadata(device: Device, sb: Superblock, *, strict: bool = True,
                  clean_seq: int | None = None) -> tuple[Metadata, int, int, list[str]]:
    """Newest checkpoint plus journal replay -> (metadata, journal end, next seq, warnings).

    ``strict``: raise on a damaged journal record instead of keeping what replayed.
    ``clean_seq``: the previous holder closed the volume cleanly after this seq and
    writes no more (a planned hand-over); if the newest checkpoint is that one, no record
    can follow it and the journal is not read at all; if it is a journal record, the
    journal is read only up to it (and the opener need not write a checkpoint).
    """
    warnings: list[str] = []
    slots = []
    for label, offset in (("A", sb.ckpt_a_offset), ("B", sb.ckpt_b_offset)):
        got = checkpoint.read_slot(device, sb, offset)
        if got is None:
            warnings.append(f"metadata checkpoint slot {label} is damaged (bad checksum)")
        else:
            slots.append((got[0].seq, label, got))
    if not slots:
        raise VolumeCorrupt(
            f"both metadata checkpoints of {device.path} are damaged; run: shoal volume fsck --repair",
            what="checkpoint",
        )
    slots.sort(key=lambda s: s[0], reverse=True)
    _, label, (head, body) = slots[0]
    meta = checkpoint.decode(head, body, sb)
    # the next checkpoint overwrites the other (older or damaged) slot first, so a crash
    # during it always leaves the slot we loaded from intact
    meta.loaded_from_other = "B" if label == "A" else "A"
    if clean_seq is not None and head.seq == clean_seq:
        return meta, 0, head.seq + 1, warnings
    result = journal.scan(device, sb, head.seq, min_epoch=head.epoch,
                          until_seq=clean_seq if clean_seq is not None and clean_seq > head.seq else None)
    if result.damage:
        if strict:
            raise VolumeCorrupt(f"{result.damage}; run: shoal volume fsck --repair", what="journal")
        warnings.append(result.damage)
    seq = head.seq
    for rec in result.records:
        for op in rec.ops:
            meta.release(meta.apply(op))
        seq = rec.seq
    meta.replayed = len(result.records)
    return meta, result.end, seq + 1, warnings


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Ascending unit numbers as (first, count) runs of consecutive units."""
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and runs[-1][0] + runs[-1][1] == u:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((u, 1))
    return runs
