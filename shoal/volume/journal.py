"""The metadata journal: records, group commit, replay scan (docs/FORMAT.md §4).

Writers call :meth:`Journal.submit` while holding the metadata lock (so log order is
apply order) and then :meth:`Journal.wait` without it. The first waiter to find no
write in progress becomes the leader: it writes every pending transaction as one
record, ``fdatasync``s, and wakes the others (group commit). A transaction is
acknowledged only when ``wait`` returns.

An optional ``guard`` callable runs before every record write; the coordinator uses it
to re-check that its epoch is still current and stop writing if it is not.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from shoal.errors import ShoalError
from shoal.volume import ops
from shoal.volume.device import Device
from shoal.volume.errors import VolumeCorrupt, VolumeError
from shoal.volume.layout import BLOCK, Superblock

MAGIC = b"SHOALJRN"
_HEAD = struct.Struct("<8s16sQQII")  # magic uuid seq epoch payload_len op_count
_CRC = struct.Struct("<II")
HEADER_SIZE = _HEAD.size + _CRC.size
assert HEADER_SIZE == 56


def record_size(payload_len: int) -> int:
    return (HEADER_SIZE + payload_len + BLOCK - 1) // BLOCK * BLOCK


def encode_record(uuid: bytes, seq: int, epoch: int, payload: bytes, count: int) -> bytes:
    head = _HEAD.pack(MAGIC, uuid, seq, epoch, len(payload), count)
    crc = zlib.crc32(payload, zlib.crc32(head))
    rec = head + _CRC.pack(crc, 0) + payload
    return rec + bytes(record_size(len(payload)) - len(rec))


@dataclass(frozen=True)
class Record:
    offset: int
    seq: int
    epoch: int
    ops: list[ops.Op]
    size: int


def _records(device: Device, sb: Superblock, after_seq: int, min_epoch: int,
             until_seq: int | None) -> tuple[list[Record], int]:
    records: list[Record] = []
    pos, expect = 0, after_seq + 1
    while pos < sb.journal_size:
        kind, rec = _read_record(device, sb, pos)
        if kind != "ok" or rec is None or rec.seq != expect or rec.epoch < min_epoch:
            break
        records.append(rec)
        pos += rec.size
        expect += 1
        if rec.seq == until_seq:
            break
    return records, pos


class _LazyJournal:
    """The journal read from its start in 1 MiB chunks, only as far as it is parsed."""

    CHUNK = 1 << 20

    def __init__(self, device: Device, sb: Superblock):
        self.device = device
        self.base = sb.journal_offset
        self.size = sb.journal_size
        self.data = bytearray()

    def pread(self, offset: int, length: int) -> bytes:
        start = offset - self.base
        end = min(start + length, self.size)
        while len(self.data) < end:
            n = min(self.CHUNK, self.size - len(self.data))
            self.data += self.device.pread(self.base + len(self.data), n)
        return bytes(self.data[start:end])


class _JournalImage:
    """The whole journal read with a few large reads, then parsed from memory: a scan
    touches every block (the damage probe), and over a network LUN one round trip per
    block would cost seconds at every coordinator takeover."""

    CHUNK = 4 << 20

    def __init__(self, device: Device, sb: Superblock):
        self.base = sb.journal_offset
        self.data = b"".join(device.pread(sb.journal_offset + off, min(self.CHUNK, sb.journal_size - off))
                             for off in range(0, sb.journal_size, self.CHUNK))

    def pread(self, offset: int, length: int) -> bytes:
        start = offset - self.base
        return self.data[start:start + length]


def _read_record(device: Device, sb: Superblock, pos: int) -> tuple[str, Record | None]:
    """Classify the record at ``pos``: ('ok', rec), ('none', None) or ('bad', None)."""
    base = sb.journal_offset + pos
    block = device.pread(base, BLOCK)
    if block[:8] != MAGIC or block[8:24] != sb.uuid:
        return "none", None
    _, _, seq, epoch, plen, count = _HEAD.unpack_from(block)
    size = record_size(plen)
    if pos + size > sb.journal_size:
        return "bad", None
    data = block if size == BLOCK else device.pread(base, size)
    crc = _CRC.unpack_from(data, _HEAD.size)[0]
    payload = data[HEADER_SIZE : HEADER_SIZE + plen]
    if zlib.crc32(payload, zlib.crc32(data[: _HEAD.size])) != crc:
        return "bad", Record(pos, seq, epoch, [], size)
    return "ok", Record(pos, seq, epoch, ops.decode_all(payload, count), size)


@dataclass
class ScanResult:
    records: list[Record]
    end: int  # where the next record goes
    damage: str | None  # a sentence when a record in the middle is damaged


def scan(device: Device, sb: Superblock, after_seq: int, *, min_epoch: int = 0,
         until_seq: int | None = None) -> ScanResult:
    """Find the records that follow checkpoint ``after_seq``, in order.

    A record with an epoch below ``min_epoch`` (the checkpoint's) was written by a
    coordinator that had already been replaced: it ends the log and is never replayed.
    ``until_seq``: the writer closed the journal cleanly after that record (a planned
    hand-over): only the journal up to it is read, with no damage probe; if it is not
    found there, the whole journal is scanned as usual.
    """
    if until_seq is not None:
        lazy = _LazyJournal(device, sb)
        records, pos = _records(lazy, sb, after_seq, min_epoch, until_seq)  # type: ignore[arg-type]
        if records and records[-1].seq == until_seq:
            return ScanResult(records, pos, None)
    device = _JournalImage(device, sb)  # type: ignore[assignment]
    records, pos = _records(device, sb, after_seq, min_epoch, None)
    expect = after_seq + 1 + len(records)
    damage = None
    # a valid record beyond the end with a seq we have not reached proves mid-log damage
    probe = pos + BLOCK
    while probe < sb.journal_size:
        kind, rec = _read_record(device, sb, probe)
        if kind == "ok" and rec is not None and rec.seq > expect and rec.epoch >= min_epoch:
            damage = (
                f"journal record {expect} at byte {sb.journal_offset + pos} is damaged; "
                f"{rec.seq - expect} later records cannot be replayed"
            )
            break
        probe += rec.size if kind == "ok" and rec is not None else BLOCK
    return ScanResult(records, pos, damage)


class JournalBroken(VolumeError):
    """A journal write failed: in-memory state is ahead of the disk; reopen the volume."""


class Journal:
    def __init__(self, device: Device, sb: Superblock, *, start: int, next_seq: int, epoch: int,
                 guard: Callable[[], None] | None = None):
        self.device = device
        self.sb = sb
        self.pos = start
        self.next_seq = next_seq
        self.epoch = epoch
        self.guard = guard
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[bytes] = []
        self._pending_data = False
        self._pending_ops = 0
        self._pending_bytes = 0
        self._submitted = 0
        self._durable = 0
        self._writing = False
        self._failed: BaseException | None = None
        self.records_written = 0

    @property
    def used(self) -> int:
        return self.pos + self._pending_bytes

    def submit(self, batch: list[ops.Op], *, data_first: bool = False) -> int:
        """Queue one transaction; returns its ticket for :meth:`wait`.

        ``data_first``: the batch maps units whose data was just written; the leader
        flushes the device before writing the record, so on power loss a map can never
        reach the disk ahead of the data it points at.
        """
        payload = b"".join(ops.encode(op) for op in batch)
        with self._cond:
            if self._failed:
                raise JournalBroken("the volume's journal could not be written; reopen the volume") from self._failed
            self._pending_data = self._pending_data or data_first
            self._pending.append(payload)
            self._pending_ops += len(batch)
            self._pending_bytes += len(payload)
            self._submitted += 1
            return self._submitted

    def wait(self, ticket: int) -> None:
        """Return once transaction ``ticket`` is durable."""
        with self._cond:
            while self._durable < ticket:
                if self._failed:
                    raise JournalBroken("the volume's journal could not be written; reopen the volume") from self._failed
                if self._writing:
                    self._cond.wait()
                    continue
                self._write_pending_locked()

    def flush_all(self) -> None:
        with self._cond:
            target = self._submitted
        self.wait(target)

    def _write_pending_locked(self) -> None:
        payload = b"".join(self._pending)
        count, last, data_first = self._pending_ops, self._submitted, self._pending_data
        self._pending, self._pending_ops, self._pending_bytes = [], 0, 0
        self._pending_data = False
        self._writing = True
        self._cond.release()
        try:
            if self.guard:
                self.guard()
            if data_first:
                self.device.flush()
            rec = encode_record(self.sb.uuid, self.next_seq, self.epoch, payload, count)
            if self.pos + len(rec) > self.sb.journal_size:
                raise VolumeCorrupt("the journal overflowed before a checkpoint", what="journal")
            self.device.pwrite_durable(self.sb.journal_offset + self.pos, rec)
        except BaseException as err:
            self._cond.acquire()
            self._failed = err
            self._writing = False
            self._cond.notify_all()
            if isinstance(err, ShoalError):
                raise  # e.g. the guard's "lease lost": already a sentence for the user
            raise JournalBroken("the volume's journal could not be written; reopen the volume") from err
        self._cond.acquire()
        self.pos += len(rec)
        self.next_seq += 1
        self.records_written += 1
        self._durable = last
        self._writing = False
        self._cond.notify_all()

    def restart(self, next_seq: int) -> None:
        """After a checkpoint: the next record goes to offset 0."""
        with self._cond:
            assert not self._pending and not self._writing
            self.pos = 0
            self.next_seq = next_seq
