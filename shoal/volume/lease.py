"""The lease area: coordinator lease and liveness slots (docs/FORMAT.md §3).

Delta leases in the spirit of sanlock: a holder proves it is alive by advancing the
counter in its own slot; an observer judges "did it change?" on its *own* monotonic
clock and never compares clocks with other hosts. All timing derives from one
``io_timeout_s`` (T): renew every 2T, a holder stops metadata writes after 4T without a
successful renewal, observers may take over after 8T without change.

This module holds the encodings, the two liveness primitives every lease holder uses
(:class:`LivenessRenewer` keeps a slot advancing and knows whether its holder is still
valid; :class:`SlotWatcher` judges other slots by change), and the offline-tool lease
(:class:`OfflineLease`), which keeps ``shoal volume fsck`` and ``shoal file …`` off a
volume a cluster is using. The coordinator election (``shoal.coordinator.election``)
builds on the same primitives and records.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from shoal.volume.device import Device
from shoal.volume.errors import VolumeCorrupt, VolumeInUse
from shoal.volume.layout import BLOCK, LEASE_SECTORS, Superblock

log = logging.getLogger(__name__)
Clock = Callable[[], float]

LEASE_MAGIC = b"SHOALCLS"
SLOT_MAGIC = b"SHOALNSL"
MAX_NODES = 64
OFFLINE_OWNER = 65
FREE = 0
DEFAULT_IO_TIMEOUT_S = 1.0

_LEASE = struct.Struct("<8sIIQQ64s64s")
_SLOT = struct.Struct("<8sIIQQI28s64s64s")
RELEASED = 1


@dataclass(frozen=True)
class LeaseTiming:
    """Lease timing derived from the I/O timeout (FORMAT.md §3.3)."""

    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S

    @property
    def renew_interval_s(self) -> float:
        return 2 * self.io_timeout_s

    @property
    def holder_stop_s(self) -> float:
        return 4 * self.io_timeout_s

    @property
    def expiry_s(self) -> float:
        return 8 * self.io_timeout_s


def _seal(body: bytes) -> bytes:
    padded = body + bytes(BLOCK - 4 - len(body))
    return padded + struct.pack("<I", zlib.crc32(padded))


def _sector_ok(block: bytes) -> bool:
    return zlib.crc32(block[: BLOCK - 4]) == struct.unpack_from("<I", block, BLOCK - 4)[0]


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


@dataclass(frozen=True)
class CoordinatorLease:
    owner: int = FREE
    io_timeout_ms: int = int(DEFAULT_IO_TIMEOUT_S * 1000)
    epoch: int = 0
    owner_generation: int = 0
    cluster: str = ""
    owner_host: str = ""

    def encode(self) -> bytes:
        return _seal(_LEASE.pack(LEASE_MAGIC, self.owner, self.io_timeout_ms, self.epoch,
                                 self.owner_generation, self.cluster.encode()[:64],
                                 self.owner_host.encode()[:64]))

    @classmethod
    def decode(cls, block: bytes) -> CoordinatorLease:
        if block == bytes(BLOCK):
            return cls()
        if block[:8] != LEASE_MAGIC or not _sector_ok(block):
            raise VolumeCorrupt("the coordinator lease sector is damaged (bad checksum)", what="coordinator lease")
        _, owner, io_ms, epoch, gen, cluster, host = _LEASE.unpack_from(block)
        return cls(owner, io_ms, epoch, gen, _text(cluster), _text(host))

    def owner_name(self) -> str:
        if self.owner == OFFLINE_OWNER:
            return f"an offline tool on {self.owner_host}"
        return f"node{self.owner}" + (f" ({self.owner_host})" if self.owner_host else "")


@dataclass(frozen=True)
class LivenessSlot:
    node_id: int = 0
    io_timeout_ms: int = int(DEFAULT_IO_TIMEOUT_S * 1000)
    generation: int = 0
    counter: int = 0
    flags: int = 0
    cluster: str = ""
    host: str = ""

    def encode(self) -> bytes:
        return _seal(_SLOT.pack(SLOT_MAGIC, self.node_id, self.io_timeout_ms, self.generation,
                                self.counter, self.flags, bytes(28), self.cluster.encode()[:64],
                                self.host.encode()[:64]))

    @classmethod
    def decode(cls, block: bytes, node_id: int) -> LivenessSlot:
        if block == bytes(BLOCK):
            return cls(node_id=node_id)
        if block[:8] != SLOT_MAGIC or not _sector_ok(block):
            raise VolumeCorrupt(f"liveness slot {node_id} is damaged (bad checksum)", what=f"liveness slot {node_id}")
        _, nid, io_ms, gen, counter, flags, _, cluster, host = _SLOT.unpack_from(block)
        return cls(nid, io_ms, gen, counter, flags, _text(cluster), _text(host))


class LeaseArea:
    """Reads and writes the 66 lease sectors of one volume, one whole sector at a time."""

    def __init__(self, device: Device, sb: Superblock):
        self.device = device
        self.offset = sb.lease_offset

    def _sector(self, n: int) -> int:
        assert 0 <= n < LEASE_SECTORS
        return self.offset + n * BLOCK

    def read_lease(self) -> CoordinatorLease:
        return CoordinatorLease.decode(self.device.pread(self._sector(0), BLOCK))

    def write_lease(self, lease: CoordinatorLease) -> None:
        self.device.pwrite(self._sector(0), lease.encode())
        self.device.flush()

    def read_slot(self, node_id: int) -> LivenessSlot:
        return LivenessSlot.decode(self.device.pread(self._sector(node_id), BLOCK), node_id)

    def write_slot(self, slot: LivenessSlot) -> None:
        self.device.pwrite(self._sector(slot.node_id), slot.encode())
        self.device.flush()

    def owner_alive(
        self,
        lease: CoordinatorLease,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.1,
    ) -> bool:
        """Watch the owner's slot for up to the expiry time; True as soon as it advances."""
        if lease.owner == FREE:
            return False
        watcher = SlotWatcher(self, LeaseTiming(lease.io_timeout_ms / 1000), clock)
        while not watcher.dead(lease.owner):
            if watcher.advanced(lease.owner):
                return True
            sleep(poll_s)
        return False


class LivenessRenewer:
    """Keeps this node's liveness slot advancing; knows whether its lease is still valid."""

    def __init__(self, area: LeaseArea, node_id: int, *, cluster: str, host: str | None = None,
                 timing: LeaseTiming | None = None, clock: Clock = time.monotonic):
        self.area = area
        self.timing = timing or LeaseTiming()
        self.clock = clock
        self.slot = LivenessSlot(node_id=node_id, io_timeout_ms=int(self.timing.io_timeout_s * 1000),
                                 cluster=cluster, host=host or socket.gethostname())
        self.last_ok_start: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def node_id(self) -> int:
        return self.slot.node_id

    def join(self) -> None:
        """Start a new generation in our slot (a rejoin is visible to observers)."""
        old = self.area.read_slot(self.node_id)
        self.slot = replace(self.slot, generation=old.generation + 1, counter=0, flags=0)
        self.renew_once()

    def renew_once(self) -> bool:
        started = self.clock()
        try:
            self.slot = replace(self.slot, counter=self.slot.counter + 1)
            self.area.write_slot(self.slot)
        except Exception as err:  # noqa: BLE001 - a failed renewal is an expected event
            log.warning("node%d: liveness renewal failed: %s", self.node_id, err)
            return False
        self.last_ok_start = started
        return True

    def valid(self) -> bool:
        """True while our last good renewal started less than 4T ago."""
        return self.last_ok_start is not None and self.clock() - self.last_ok_start < self.timing.holder_stop_s

    def start(self) -> None:
        self.join()
        self._thread = threading.Thread(target=self._run, name=f"renew-node{self.node_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.timing.renew_interval_s
        while not self._stop.wait(wait):
            # after a failure retry within T, so one slow write does not cost the lease
            wait = self.timing.renew_interval_s if self.renew_once() else self.timing.io_timeout_s

    def stop(self, *, release: bool = True) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        # invalid from now on: observers treat a released slot as dead at once
        self.last_ok_start = None
        if release:
            self.area.write_slot(replace(self.slot, flags=RELEASED))


@dataclass
class _Seen:
    key: tuple[int, int, int]
    changed_at: float
    changes: int = 0
    polled_at: float = 0.0
    judged_from: float = 0.0  # start of the unbroken watch the dead-clock counts from


class SlotWatcher:
    """Judges other nodes' slots by "did it change?" on our own monotonic clock.

    Only time we watched counts: when two polls of a slot are more than
    ``holder_stop_s`` (4T) apart — our own reads failed, our path was down, we were
    frozen — the dead-clock starts again at the later poll. Otherwise a watcher that
    was blind while every node lost the LUN would, on its first read after, judge
    dead every node whose next renewal had not landed yet."""

    def __init__(self, area: LeaseArea, timing: LeaseTiming, clock: Clock = time.monotonic):
        self.area = area
        self.timing = timing
        self.clock = clock
        self._seen: dict[int, _Seen] = {}

    def poll(self, node_id: int) -> LivenessSlot:
        slot = self.area.read_slot(node_id)
        key = (slot.generation, slot.counter, slot.flags)
        now = self.clock()
        seen = self._seen.get(node_id)
        if seen is None:
            seen = self._seen[node_id] = _Seen(key, now, judged_from=now)
        elif seen.key != key:
            seen = self._seen[node_id] = _Seen(key, now, seen.changes + 1, judged_from=now)
        elif now - seen.polled_at > self.timing.holder_stop_s:
            seen.judged_from = now  # we were blind: judge nobody by time we could not see
        seen.polled_at = now
        return slot

    def advanced(self, node_id: int) -> bool:
        """The slot changed at least once since we first looked: its owner is alive."""
        seen = self._seen.get(node_id)
        return seen is not None and seen.changes > 0

    def fresh_until(self, node_id: int, within_s: float) -> float:
        """Until when (on our clock) the slot counts as advancing: ``within_s`` after its
        last change was seen; 0.0 if it never changed while we watched."""
        seen = self._seen.get(node_id)
        return seen.changed_at + within_s if seen is not None and seen.changes > 0 else 0.0

    def dead(self, node_id: int) -> bool:
        """Unchanged for 8T since we first looked, or released cleanly."""
        return self.judge(node_id)[1]

    def judge(self, node_id: int) -> tuple[LivenessSlot, bool]:
        """The slot as read now, and whether its owner is dead (see :meth:`dead`)."""
        slot = self.poll(node_id)
        if slot.flags & RELEASED or slot.generation == 0:
            return slot, True
        return slot, self.clock() - self._seen[node_id].judged_from >= self.timing.expiry_s


def in_use_error(lease: CoordinatorLease, volume_name: str) -> VolumeInUse:
    cluster = lease.cluster or "(unnamed)"
    return VolumeInUse(
        f"volume {volume_name or '(unnamed)'} is in use by cluster {cluster}, coordinator "
        f"{lease.owner_name()}; stop the cluster first, or run the online command from a node",
        cluster=cluster,
        owner=lease.owner_name(),
    )


class OfflineLease:
    """The lease an offline tool holds while it writes a volume (owner 65).

    ``acquire`` refuses with :class:`VolumeInUse` when the lease is held by a live
    owner; it takes over a lease whose owner's slot stopped advancing. A
    :class:`LivenessRenewer` keeps slot 65 advancing while the tool runs; ``release``
    gives the lease back.
    """

    def __init__(self, area: LeaseArea, volume_name: str, *, timing: LeaseTiming | None = None):
        self.area = area
        self.volume_name = volume_name
        self.timing = timing or LeaseTiming()
        self._renewer: LivenessRenewer | None = None
        self.lease: CoordinatorLease | None = None
        self.took_over_from: str | None = None

    def acquire(self) -> None:
        current = self.area.read_lease()
        if current.owner != FREE:
            if self.area.owner_alive(current):
                raise in_use_error(current, self.volume_name)
            self.took_over_from = current.owner_name()
        renewer = LivenessRenewer(self.area, OFFLINE_OWNER, cluster=current.cluster, timing=self.timing)
        renewer.start()
        self._renewer = renewer
        self.lease = CoordinatorLease(OFFLINE_OWNER, int(self.timing.io_timeout_s * 1000),
                                      current.epoch + 1, renewer.slot.generation, current.cluster,
                                      renewer.slot.host)
        self.area.write_lease(self.lease)

    def guard(self) -> None:
        """Before every metadata write: our renewals are current and the lease still ours.

        Two claimants that both saw the lease free both write it; the later write wins,
        and the earlier one stops here before it changes anything.
        """
        if self.lease is None or self._renewer is None:
            raise VolumeInUse("the offline lease was released; reopen the volume")
        if not self._renewer.valid():
            raise VolumeInUse("the offline lease could not be renewed in time; stopped writing")
        now = self.area.read_lease()
        if now != self.lease:
            raise in_use_error(now, self.volume_name)

    def release(self) -> None:
        if self._renewer is not None:
            self._renewer.stop(release=True)
            self._renewer = None
        if self.lease is not None:
            self.area.write_lease(replace(self.lease, owner=FREE, owner_host=""))
            self.lease = None
