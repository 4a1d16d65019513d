"""The volume's metadata in memory: namespace, extent maps, allocation.

:meth:`Metadata.apply` is the single place where an operation changes state; the live
volume and journal replay both go through it, so replay reproduces exactly what was
acknowledged. Validation (does the name exist, is the range a hole...) happens in
:mod:`shoal.volume.volume` *before* an operation is logged; ``apply`` assumes valid
input and raises :class:`VolumeCorrupt` if replayed input is not.

Allocation state is one byte per unit (0 free, 1 used). Units freed by an operation are
returned to the caller, which releases them only once the freeing record is durable
(FORMAT.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.volume import ops
from shoal.volume.errors import VolumeCorrupt
from shoal.volume.extents import ExtentMap

ROOT = 1
FREE_BYTE = b"\x00"
INODE_BYTES = 40
EXTENT_BYTES = 20


@dataclass(eq=False)
class Inode:
    ino: int
    parent: int
    name: str
    kind: int
    flags: int = 0
    size: int = 0
    mtime_ns: int = 0
    extents: ExtentMap = field(default_factory=ExtentMap)
    children: dict[str, int] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.kind == ops.DIRECTORY


class Metadata:
    def __init__(self, unit_size: int, unit_count: int):
        self.unit_size = unit_size
        self.unit_count = unit_count
        self.inodes: dict[int, Inode] = {ROOT: Inode(ROOT, ROOT, "", ops.DIRECTORY)}
        self.bitmap = bytearray(unit_count)
        self.used_units = 0
        self.next_ino = ROOT + 1
        self._hint = 0
        #: free units known to hold durable zeros (the coordinator's pool, memory only):
        #: an allocation that takes one need not zero it again. Using a unit drops it.
        self.zeroed: set[int] = set()
        #: bytes of the checkpoint body this metadata encodes to (FORMAT.md §5), kept exact
        self.image_bytes = unit_count + INODE_BYTES
        #: which checkpoint slot the next checkpoint writes first (set by the loader)
        self.loaded_from_other = "A"
        #: journal records replayed on top of the checkpoint when this was loaded
        self.replayed = 0

    # ---- allocation ----------------------------------------------------------------

    def mark_used(self, unit: int, count: int) -> None:
        self.bitmap[unit : unit + count] = b"\x01" * count
        self.used_units += count
        if self.zeroed:
            self.zeroed.difference_update(range(unit, unit + count))

    def free_ahead(self, count: int, skip: set[int]) -> list[int]:
        """Up to ``count`` free units not in ``skip``, in the order :meth:`find_free`
        hands single units out (from the allocation cursor on, then from 0)."""
        found: list[int] = []
        for start, end in ((self._hint, self.unit_count), (0, self._hint)):
            pos = start
            while len(found) < count:
                pos = self.bitmap.find(FREE_BYTE, pos, end)
                if pos < 0:
                    break
                if pos not in skip:
                    found.append(pos)
                pos += 1
        return found

    def mark_free(self, unit: int, count: int) -> None:
        self.bitmap[unit : unit + count] = bytes(count)
        self.used_units -= count

    def find_free(self, count: int, hint: int | None = None) -> list[tuple[int, int]] | None:
        """Pick ``count`` free units, contiguous if possible; None if not enough are free."""
        if self.unit_count - self.used_units < count:
            return None
        start = self._hint if hint is None else min(max(hint, 0), self.unit_count)
        need = b"\x00" * count
        pos = self.bitmap.find(need, start)
        if pos < 0:
            pos = self.bitmap.find(need, 0)
        if pos >= 0:
            self._hint = pos + count
            return [(pos, count)]
        runs: list[tuple[int, int]] = []
        pos, left = 0, count
        while left:
            pos = self.bitmap.find(FREE_BYTE, pos)
            end = pos + 1
            while end < self.unit_count and end - pos < left and self.bitmap[end] == 0:
                end += 1
            runs.append((pos, end - pos))
            left -= end - pos
            pos = end
        return runs

    def find_contiguous(self, count: int) -> int | None:
        pos = self.bitmap.find(b"\x00" * count)
        return None if pos < 0 else pos

    # ---- namespace -----------------------------------------------------------------

    def child(self, parent: Inode, name: str) -> Inode | None:
        ino = parent.children.get(name)
        return None if ino is None else self.inodes[ino]

    def path_of(self, ino: int) -> str:
        parts = []
        seen = 0
        while ino != ROOT:
            node = self.inodes[ino]
            parts.append(node.name)
            ino = node.parent
            seen += 1
            if seen > len(self.inodes):
                raise VolumeCorrupt("the directory tree has a loop", what="namespace")
        return "/" + "/".join(reversed(parts))

    # ---- the one place that changes state -------------------------------------------

    def image_growth(self, batch: list[ops.Op]) -> tuple[int, int]:
        """Upper bounds of how much ``batch`` can grow the checkpoint image:
        (growth from new files and new extents, growth from anything else)."""
        new = other = 0
        for op in batch:
            if isinstance(op, ops.Create):
                new += INODE_BYTES + len(op.name.encode())
            elif isinstance(op, ops.Map | ops.Remap):
                new += EXTENT_BYTES
            elif isinstance(op, ops.Unmap | ops.SetSize):
                other += EXTENT_BYTES  # a cut inside a run splits it in two
            elif isinstance(op, ops.Rename):
                other += max(0, len(op.dst_name.encode()) - len(op.src_name.encode()))
        return new, other

    def apply(self, op: ops.Op) -> list[tuple[int, int]]:
        """Apply ``op``; return the units it frees as (unit, count) runs."""
        node = self.inodes.get(getattr(op, "ino", 0))
        runs_before = len(node.extents) if node is not None else 0
        try:
            freed = self._apply(op)
        except (KeyError, IndexError, AssertionError) as err:
            raise VolumeCorrupt(f"journal operation {type(op).__name__} does not fit the metadata", what="journal") from err
        if node is not None:
            self.image_bytes += EXTENT_BYTES * (len(node.extents) - runs_before)
        return freed

    def _apply(self, op: ops.Op) -> list[tuple[int, int]]:
        if isinstance(op, ops.Map):
            node = self.inodes[op.ino]
            node.extents.map(op.file_unit, op.unit, op.n)
            if not self.bitmap[op.unit : op.unit + op.n].count(1) == 0:
                # the live volume reserved these units already; replay marks them now
                assert self.bitmap[op.unit : op.unit + op.n].count(0) == 0
            else:
                self.mark_used(op.unit, op.n)
            return []
        if isinstance(op, ops.Create):
            parent = self.inodes[op.parent]
            assert parent.is_dir and op.name not in parent.children
            self.inodes[op.ino] = Inode(op.ino, op.parent, op.name, op.kind, op.flags, 0, op.mtime_ns)
            parent.children[op.name] = op.ino
            self.image_bytes += INODE_BYTES + len(op.name.encode())
            parent.mtime_ns = op.mtime_ns
            self.next_ino = max(self.next_ino, op.ino + 1)
            return []
        if isinstance(op, ops.Remove):
            parent = self.inodes[op.parent]
            node = self.inodes[parent.children[op.name]]
            assert not node.children  # checked before anything changes
            del self.inodes[parent.children.pop(op.name)]
            self.image_bytes -= INODE_BYTES + len(node.name.encode()) + EXTENT_BYTES * len(node.extents)
            return node.extents.unmap(0, node.extents.end_unit())
        if isinstance(op, ops.Rename):
            src = self.inodes[op.src_parent]
            dst = self.inodes[op.dst_parent]
            assert op.dst_name not in dst.children and op.src_name in src.children
            ino = src.children.pop(op.src_name)
            self.image_bytes += len(op.dst_name.encode()) - len(op.src_name.encode())
            dst.children[op.dst_name] = ino
            node = self.inodes[ino]
            node.parent, node.name = op.dst_parent, op.dst_name
            src.mtime_ns = dst.mtime_ns = op.mtime_ns
            return []
        if isinstance(op, ops.SetSize):
            node = self.inodes[op.ino]
            node.size, node.mtime_ns = op.size, op.mtime_ns
            keep = -(-op.size // self.unit_size)
            end = node.extents.end_unit()
            return node.extents.unmap(keep, end - keep) if end > keep else []
        if isinstance(op, ops.Unmap):
            return self.inodes[op.ino].extents.unmap(op.file_unit, op.n)
        if isinstance(op, ops.Remap):
            node = self.inodes[op.ino]
            freed = node.extents.unmap(op.file_unit, op.n)
            assert sum(n for _, n in freed) == op.n
            node.extents.map(op.file_unit, op.unit, op.n)
            if self.bitmap[op.unit : op.unit + op.n].count(0) == op.n:
                self.mark_used(op.unit, op.n)
            return freed
        raise AssertionError(f"unknown operation {op!r}")

    def release(self, runs: list[tuple[int, int]]) -> None:
        for unit, count in runs:
            self.mark_free(unit, count)
