"""Election logic with a fake clock, on a small real volume file (no sleeping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.coordinator.election import Election, LivenessRenewer, Role, SlotWatcher
from shoal.coordinator.errors import LeaseLost
from shoal.volume import format_volume
from shoal.volume.device import Device
from shoal.volume.lease import LeaseArea, LeaseTiming
from shoal.volume.volume import read_superblock

T = LeaseTiming(1.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.fixture
def area(tmp_path: Path) -> LeaseArea:
    path = str(tmp_path / "v.img")
    format_volume(path, 64 << 20)
    dev = Device(path)
    sb, _ = read_superblock(dev)
    return LeaseArea(dev, sb)


def _node(area: LeaseArea, node: int, clock: FakeClock, changes: list[tuple[str, str]] | None = None) -> Election:
    renewer = LivenessRenewer(area, node, cluster="c", timing=T, clock=clock)
    renewer.join()
    return Election(area, renewer, cluster="c", clock=clock, sleep=clock.sleep,
                    on_change=(lambda a, b, why: changes.append((a.value, b.value))) if changes is not None else None)


def test_free_lease_is_taken_after_the_read_back(area: LeaseArea) -> None:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    e = _node(area, 1, clock, changes)
    e.renewer.renew_once()
    assert e.acquire()
    assert e.role is Role.COORDINATOR and e.epoch == 1
    assert changes == [("follower", "contending"), ("contending", "coordinator")]
    e.guard()


def test_live_owner_is_never_displaced(area: LeaseArea) -> None:
    clock = FakeClock()
    a, b = _node(area, 1, clock), _node(area, 2, clock)
    assert a.acquire()
    # a keeps renewing while b watches: b gives up at its deadline, never takes over
    original_sleep = clock.sleep

    def sleep_and_renew(s: float) -> None:
        original_sleep(s)
        a.renewer.renew_once()

    b.sleep = sleep_and_renew
    b.renewer.renew_once()
    assert not b.acquire(deadline_s=30)
    assert b.role is Role.FOLLOWER
    assert area.read_lease().owner == 1


def test_silent_owner_expires_after_eight_io_timeouts(area: LeaseArea) -> None:
    clock = FakeClock()
    a, b = _node(area, 1, clock), _node(area, 2, clock)
    assert a.acquire()
    start = clock.now

    def sleep_keep_b_alive(s: float) -> None:
        clock.now += s
        b.renewer.renew_once()

    b.sleep = sleep_keep_b_alive
    assert b.acquire()
    assert clock.now - start >= T.expiry_s
    assert b.epoch == a.epoch + 1
    # the old holder's guard now refuses: its own liveness lapsed and the epoch moved
    with pytest.raises(LeaseLost):
        a.guard()
    assert a.role is Role.LOST


def test_holder_stops_writing_four_timeouts_after_its_last_renewal(area: LeaseArea) -> None:
    clock = FakeClock()
    a = _node(area, 1, clock)
    assert a.acquire()
    a.renewer.renew_once()
    clock.now += T.holder_stop_s - 0.01
    a.guard()
    clock.now += 0.02
    with pytest.raises(LeaseLost, match="4 I/O timeouts"):
        a.guard()


def test_illegal_transition_raises(area: LeaseArea) -> None:
    e = _node(area, 1, FakeClock())
    with pytest.raises(AssertionError, match="illegal"):
        e._set_state(Role.COORDINATOR, "skipping contention")


def _watched_slot(area: LeaseArea) -> tuple[FakeClock, LivenessRenewer, SlotWatcher]:
    """Node 5 joined; a watcher that has looked at its slot once."""
    clock = FakeClock()
    r = LivenessRenewer(area, 5, cluster="c", timing=T, clock=clock)
    r.join()
    w = SlotWatcher(area, T, clock)
    assert not w.dead(5)
    return clock, r, w


def test_watcher_judges_change_on_its_own_clock(area: LeaseArea) -> None:
    clock, r, w = _watched_slot(area)
    _watch(w, clock, T.expiry_s - 0.1)
    r.renew_once()
    assert not w.dead(5)
    _watch(w, clock, T.expiry_s)
    assert w.dead(5)


def _watch(w: SlotWatcher, clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass with the watcher polling slot 5 every T/2, as the agent does."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(end, clock.now + T.io_timeout_s / 2)
        w.poll(5)


def test_watcher_does_not_count_time_it_could_not_see(area: LeaseArea) -> None:
    clock, _, w = _watched_slot(area)
    clock.now += T.expiry_s + 5  # our reads failed all this time: no polls
    assert not w.dead(5), "judged dead by time the watcher did not see"
    _watch(w, clock, T.expiry_s - 0.1)
    assert not w.dead(5)
    _watch(w, clock, 0.1)  # 8T watched, never renewed
    assert w.dead(5)
