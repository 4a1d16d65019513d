"""Make every file contiguous on the volume (like defrag on CSV).

For each fragmented file: reserve one free run as long as its mapped units, copy the
data there, flush, then commit REMAP operations that point the file at the copies; the
old units are freed only when that record is durable. A crash before the commit leaves
the file as it was (the copies sit in free units and are never exposed, FORMAT.md §4.1).
Holes stay holes. The file's I/O lock is held exclusively while it moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.volume import ops
from shoal.volume.volume import MAX_OPS_PER_TXN, Volume

COPY_CHUNK = 8 << 20


@dataclass
class DefragResult:
    moved: list[str] = field(default_factory=list)
    already: int = 0
    skipped: list[str] = field(default_factory=list)  # sentences: why a file was left alone
    bytes_moved: int = 0


def fragmented(vol: Volume) -> list[tuple[str, int]]:
    """(path, mapped units) of every file whose units are not one physical run."""
    out = []
    for path, st in vol.walk_files():
        if st.extents > 1:
            out.append((path, st.allocated // vol.sb.unit_size))
    return out


def defrag(vol: Volume, *, progress: Callable[[int], None] | None = None) -> DefragResult:
    result = DefragResult()
    todo = fragmented(vol)
    result.already = sum(1 for _ in vol.walk_files()) - len(todo)
    for path, _ in todo:
        if _defrag_file(vol, path, result, progress):
            result.moved.append(path)
    return result


def _defrag_file(vol: Volume, path: str, result: DefragResult, progress: Callable[[int], None] | None) -> bool:
    f = vol.open_file(path)
    U = vol.sb.unit_size
    io = vol._io_lock(f.ino)
    io.acquire_exclusive()
    try:
        with vol._lock:
            runs = list(f._node().extents.runs())
            total = sum(n for _, _, n in runs)
            start = vol.meta.find_contiguous(total)
            if start is None:
                result.skipped.append(f"{path}: no free run of {total} units; free space first")
                return False
            vol.meta.mark_used(start, total)
            vol._reserved[start] = total
        try:
            batch: list[ops.Op] = []
            dest = start
            for fu, unit, count in runs:
                _copy(vol, vol.sb.unit_offset(unit), vol.sb.unit_offset(dest), count * U, progress)
                batch.append(ops.Remap(f.ino, fu, dest, count))
                dest += count
            vol.device.flush()
            # each REMAP is valid on its own, so a very fragmented file moves in chunks;
            # the copies stay reserved until the last chunk is queued
            cursor = start  # copies before it are mapped; from it on they are still reserved
            for i in range(0, len(batch), MAX_OPS_PER_TXN):
                chunk = batch[i : i + MAX_OPS_PER_TXN]
                with vol._lock:
                    ticket = vol._log(chunk, data_first=True)
                    left = vol._reserved.pop(cursor)
                    cursor += sum(op.n for op in chunk if isinstance(op, ops.Remap))
                    left = start + total - cursor
                    if left:
                        vol._reserved[cursor] = left
        except BaseException:
            with vol._lock:
                still = [(u, n) for u, n in vol._reserved.items() if start <= u < start + total]
            vol._unreserve(still, free=True)
            raise
        vol._wait(ticket)
        result.bytes_moved += total * U
        return True
    finally:
        io.release_exclusive()


def _copy(vol: Volume, src: int, dst: int, length: int, progress: Callable[[int], None] | None) -> None:
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        vol.device.pwrite(dst + done, vol.device.pread(src + done, n))
        done += n
        if progress:
            progress(n)
