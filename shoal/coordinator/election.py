"""Who is coordinator of a volume: liveness renewal and the coordinator lease on disk.

Delta leases (Chockler and Malkhi, as sanlock uses them), with all timing derived from
one I/O timeout T (:class:`shoal.volume.lease.LeaseTiming`):

- every node renews its liveness slot every 2T (:class:`LivenessRenewer`);
- a node whose last *successful* renewal *started* more than 4T ago is no longer valid:
  as coordinator it stops every metadata write (:meth:`Election.guard`);
- an observer declares a slot dead when it has not changed for 8T on the observer's
  own monotonic clock (:class:`SlotWatcher`); clocks are never compared.

Safety (never two coordinators): the holder's writes stop 4T after the start of its last
good renewal; observers saw that renewal land no earlier than its start, and wait 8T
after the last change they saw. The 4T between covers a write that was in flight.

Acquisition (:meth:`Election.acquire`): read the lease; if it is held, watch the owner's
slot *and the lease sector* until the slot has been unchanged for 8T (any change of the
lease sector restarts the wait: somebody else is contending); write ourselves as owner
with epoch + 1; wait 2T; read back. Still ours: we are coordinator. Otherwise another
contender's later write won, and we go back to following. Only after ``acquire``
returns does the caller replay the journal and serve requests.

States (stable names, they appear in the API)::

    follower ──► contending ──► coordinator ──► released
        ▲             │              │
        └─────────────┘              └──► lost (could not renew in time, or epoch moved)
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from shoal.coordinator.errors import LeaseLost, NotCoordinator
from shoal.volume.lease import (
    FREE,
    CoordinatorLease,
    LeaseArea,
    LivenessRenewer,
    SlotWatcher,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Role(enum.Enum):
    FOLLOWER = "follower"
    CONTENDING = "contending"
    COORDINATOR = "coordinator"
    RELEASED = "released"
    LOST = "lost"


_TRANSITIONS: dict[Role, set[Role]] = {
    Role.FOLLOWER: {Role.CONTENDING},
    Role.CONTENDING: {Role.COORDINATOR, Role.FOLLOWER},
    Role.COORDINATOR: {Role.RELEASED, Role.LOST},
    Role.RELEASED: {Role.CONTENDING},
    Role.LOST: {Role.CONTENDING},
}


class Election:
    """The coordinator lease of one volume, from the point of view of one node."""

    def __init__(self, area: LeaseArea, renewer: LivenessRenewer, *, cluster: str,
                 clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 on_change: Callable[[Role, Role, str], None] | None = None):
        self.area = area
        self.renewer = renewer
        self.timing = renewer.timing
        self.cluster = cluster
        self.clock = clock
        self.sleep = sleep
        self.watcher = SlotWatcher(area, self.timing, clock)
        self.role = Role.FOLLOWER
        self.lease: CoordinatorLease | None = None
        self._on_change = on_change
        self._cond = threading.Condition()

    def _set_state(self, new: Role, why: str) -> None:
        with self._cond:
            old = self.role
            if new not in _TRANSITIONS[old]:
                raise AssertionError(f"illegal coordinator transition {old.value} -> {new.value}")
            self.role = new
            self._cond.notify_all()
        log.info("node%d: %s -> %s: %s", self.renewer.node_id, old.value, new.value, why)
        if self._on_change:
            self._on_change(old, new, why)

    @property
    def epoch(self) -> int:
        return self.lease.epoch if self.lease else 0

    def acquire(self, *, deadline_s: float | None = None) -> bool:
        """Try to become coordinator; returns True when we are. Blocks up to about 8T + 2T,
        or ``deadline_s`` if given. Never takes a lease whose owner is alive."""
        self._set_state(Role.CONTENDING, "contending for the coordinator lease")
        try:
            return self._acquire(deadline_s)
        except BaseException:
            if self.role is Role.CONTENDING:
                self._set_state(Role.FOLLOWER, "contending failed (I/O error)")
            raise

    def _acquire(self, deadline_s: float | None) -> bool:
        give_up = None if deadline_s is None else self.clock() + deadline_s
        current = self.area.read_lease()
        while current.owner not in (FREE, self.renewer.node_id):
            if give_up is not None and self.clock() >= give_up:
                self._set_state(Role.FOLLOWER, f"{current.owner_name()} still holds the lease")
                return False
            if self.watcher.dead(current.owner):
                break
            self.sleep(min(self.timing.io_timeout_s / 4, 0.25))
            again = self.area.read_lease()
            if again != current:
                current = again  # somebody else took it or is contending: start over
                self.watcher = SlotWatcher(self.area, self.timing, self.clock)
        if not self.renewer.valid():
            self._set_state(Role.FOLLOWER, "our own liveness slot is not being renewed")
            return False
        mine = self._claim(current.epoch + 1)
        self.area.write_lease(mine)
        self.sleep(self.timing.renew_interval_s)
        if self.area.read_lease() != mine:
            self._set_state(Role.FOLLOWER, "another contender's claim came later and won")
            return False
        if not self.renewer.valid():
            self._set_state(Role.FOLLOWER, "our liveness lapsed while we claimed the lease")
            return False
        self.lease = mine
        self._set_state(Role.COORDINATOR, f"acquired the coordinator lease, epoch {mine.epoch}")
        return True

    def _claim(self, epoch: int) -> CoordinatorLease:
        """The lease record naming us as owner at ``epoch``."""
        return CoordinatorLease(self.renewer.node_id, int(self.timing.io_timeout_s * 1000), epoch,
                                self.renewer.slot.generation, self.cluster, self.renewer.slot.host)

    def guard(self) -> None:
        """Called before every metadata write: raise unless we still may write.

        Checks our own liveness (4T rule) and that the lease on disk still names us
        with our epoch, so a coordinator that was frozen or cut off stops by itself.
        """
        if self.role is not Role.COORDINATOR or self.lease is None:
            raise NotCoordinator("this node is not the coordinator of the volume")
        if not self.renewer.valid():
            self._lose("our liveness renewals stopped for 4 I/O timeouts")
        on_disk = self.area.read_lease()
        if on_disk.owner != self.lease.owner or on_disk.epoch != self.lease.epoch:
            self._lose(f"the lease now names {on_disk.owner_name()} with epoch {on_disk.epoch}")

    def _lose(self, why: str) -> None:
        if self.role is Role.COORDINATOR:
            self._set_state(Role.LOST, why)
        raise LeaseLost(f"stopped writing metadata: {why}")

    def take_over(self, expected: CoordinatorLease, *, wait: bool) -> bool:
        """Hand-over at the holder's request: the holder (``expected`` is its lease on disk)
        asked us to take the role, so we need not wait for its slot to expire. Writes us as
        owner with epoch + 1; with ``wait`` (the holder lost its storage path, so its slot
        may already be stale for contenders) waits 2T and reads back like ``acquire``."""
        self._set_state(Role.CONTENDING, f"taking over from {expected.owner_name()} at its request")
        try:
            if self.area.read_lease() != expected or not self.renewer.valid():
                self._set_state(Role.FOLLOWER, "the lease changed before the hand-over")
                return False
            mine = self._claim(expected.epoch + 1)
            self.area.write_lease(mine)
            if wait:
                self.sleep(self.timing.renew_interval_s)
                if self.area.read_lease() != mine:
                    self._set_state(Role.FOLLOWER, "another contender's claim came later and won")
                    return False
        except BaseException:
            if self.role is Role.CONTENDING:
                self._set_state(Role.FOLLOWER, "the hand-over failed (I/O error)")
            raise
        self.lease = mine
        self._set_state(Role.COORDINATOR, f"took over the coordinator lease, epoch {mine.epoch}")
        return True

    def resign(self, why: str) -> None:
        """Stop being coordinator without touching the disk (a successor overwrites the
        lease, or it expires)."""
        if self.role is Role.COORDINATOR:
            self._set_state(Role.RELEASED, why)

    def release(self) -> None:
        """Planned hand-over: free the lease (keeping the epoch) so a successor need not wait."""
        if self.role is not Role.COORDINATOR or self.lease is None:
            return
        on_disk = self.area.read_lease()
        if on_disk == self.lease:
            self.area.write_lease(replace(self.lease, owner=FREE, owner_host=""))
        self._set_state(Role.RELEASED, "released the coordinator lease")
