"""A file's extent map: sorted runs of (file unit, volume unit, count).

Pure data structure, no I/O. Adjacent runs that are contiguous both in the file and on
the volume are merged, so a contiguous file is a single run.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

Run = tuple[int, int, int]  # (file_unit, unit, count)


class ExtentMap:
    __slots__ = ("_l", "_p", "_n")

    def __init__(self) -> None:
        self._l: list[int] = []
        self._p: list[int] = []
        self._n: list[int] = []

    def __len__(self) -> int:
        return len(self._l)

    def runs(self) -> Iterator[Run]:
        return zip(self._l, self._p, self._n, strict=True)

    def mapped_units(self) -> int:
        return sum(self._n)

    def end_unit(self) -> int:
        """One past the last mapped file unit (0 when empty)."""
        return self._l[-1] + self._n[-1] if self._l else 0

    def segments(self, start: int, count: int) -> list[tuple[int, int | None, int]]:
        """Cover ``[start, start+count)`` with (file_unit, unit or None for a hole, count)."""
        out: list[tuple[int, int | None, int]] = []
        pos, end = start, start + count
        i = max(bisect.bisect_right(self._l, start) - 1, 0)
        while pos < end:
            if i < len(self._l) and self._l[i] + self._n[i] <= pos:
                i += 1
                continue
            if i >= len(self._l) or self._l[i] >= end:
                out.append((pos, None, end - pos))
                break
            l0, p0, n0 = self._l[i], self._p[i], self._n[i]
            if l0 > pos:
                out.append((pos, None, l0 - pos))
                pos = l0
            take = min(l0 + n0, end) - pos
            out.append((pos, p0 + (pos - l0), take))
            pos += take
            i += 1
        return out

    def is_hole(self, start: int, count: int) -> bool:
        return all(p is None for _, p, _ in self.segments(start, count))

    def is_mapped(self, start: int, count: int) -> bool:
        return all(p is not None for _, p, _ in self.segments(start, count))

    def map(self, start: int, unit: int, count: int) -> None:
        """Map a hole; the caller has checked that ``[start, start+count)`` is one."""
        i = bisect.bisect_left(self._l, start)
        self._l.insert(i, start)
        self._p.insert(i, unit)
        self._n.insert(i, count)
        self._merge(i)
        if i > 0:
            self._merge(i - 1)

    def _merge(self, i: int) -> None:
        if i + 1 < len(self._l) and self._l[i] + self._n[i] == self._l[i + 1] and self._p[i] + self._n[i] == self._p[i + 1]:
            self._n[i] += self._n[i + 1]
            del self._l[i + 1], self._p[i + 1], self._n[i + 1]

    def unmap(self, start: int, count: int) -> list[tuple[int, int]]:
        """Turn ``[start, start+count)`` into a hole; return the freed (unit, count) runs."""
        freed: list[tuple[int, int]] = []
        end = start + count
        i = max(bisect.bisect_right(self._l, start) - 1, 0)
        while i < len(self._l) and self._l[i] < end:
            l0, p0, n0 = self._l[i], self._p[i], self._n[i]
            e0 = l0 + n0
            if e0 <= start:
                i += 1
                continue
            cut_s, cut_e = max(l0, start), min(e0, end)
            freed.append((p0 + cut_s - l0, cut_e - cut_s))
            pieces = []
            if l0 < cut_s:
                pieces.append((l0, p0, cut_s - l0))
            if cut_e < e0:
                pieces.append((cut_e, p0 + cut_e - l0, e0 - cut_e))
            del self._l[i], self._p[i], self._n[i]
            for k, (a, b, c) in enumerate(pieces):
                self._l.insert(i + k, a)
                self._p.insert(i + k, b)
                self._n.insert(i + k, c)
            i += len(pieces)
        return freed
