"""The link state machine: exact transition sequences on a fake clock."""

from __future__ import annotations

import pytest

from shoal.config.timing import Timing
from shoal.membership import IllegalTransition, Membership, NodeState
from shoal.netft.links import IllegalTransition as LinkIllegal
from shoal.netft.links import Link, LinkState

T = Timing()  # 1 s, 5 missed, 3 to come back


def watched() -> tuple[Link, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    link = Link("b", "cluster", T, on_change=lambda _l, old, new: seen.append((old.value, new.value)))
    return link, seen


def test_comes_up_after_three_good_heartbeats_and_down_after_five_missed() -> None:
    link, seen = watched()
    link.on_heartbeat(0.0, peer_hears_us=False)  # the peer has not heard us yet
    assert link.state is LinkState.DOWN
    for t in (1.0, 2.0):
        link.on_heartbeat(t, True)
    assert link.state is LinkState.JOINING
    link.on_heartbeat(3.0, True)
    assert link.state is LinkState.UP
    link.on_tick(3.0 + 5.0)  # exactly 5 s: not yet
    assert link.state is LinkState.UP
    link.on_tick(8.01)
    assert seen == [("down", "joining"), ("joining", "up"), ("up", "down")]


def test_late_heartbeat_restarts_hysteresis() -> None:
    link, seen = watched()
    link.on_heartbeat(0.0, True)
    link.on_heartbeat(1.0, True)
    link.on_heartbeat(3.5, True)  # a gap of more than two intervals
    assert link.state is LinkState.JOINING and link.good_in_a_row == 1
    link.on_heartbeat(4.5, True)
    link.on_heartbeat(5.5, True)
    assert link.state is LinkState.UP


def test_peer_that_does_not_hear_us_means_link_down() -> None:
    link, seen = watched()
    for t in range(3):
        link.on_heartbeat(float(t), True)
    link.on_heartbeat(3.0, False)
    assert seen[-1] == ("up", "down")
    assert link.hears(3.5) and not link.hears(9.0)


def test_joining_that_stops_goes_down() -> None:
    link, seen = watched()
    link.on_heartbeat(0.0, True)
    link.on_tick(5.5)
    assert seen == [("down", "joining"), ("joining", "down")]


def test_membership_transitions() -> None:
    seen: list[tuple[str, str, str]] = []
    m = Membership("a", ["b", "c"])
    m.listeners.append(lambda n, o, new: seen.append((n, o.value, new.value)))
    assert m.state("a") is NodeState.UP and m.state("b") is NodeState.DOWN
    m.update("b", any_link_up=True)
    m.update("b", any_link_up=True)
    m.update("b", any_link_up=False, disk_alive=True)
    m.update("b", any_link_up=False, disk_alive=False)
    m.update("a", any_link_up=False)  # never judges itself
    assert seen == [("b", "down", "up"), ("b", "up", "isolated"), ("b", "isolated", "down")]


def test_illegal_transitions_raise() -> None:
    link, _ = watched()
    for t in range(3):
        link.on_heartbeat(float(t), True)
    with pytest.raises(LinkIllegal):
        link._set_state(LinkState.JOINING, "up cannot go back to joining")
    m = Membership("a", ["b"])
    m.states["b"] = NodeState.UP
    from shoal import membership

    saved = membership._TRANSITIONS[NodeState.UP]
    membership._TRANSITIONS[NodeState.UP] = set()
    try:
        with pytest.raises(IllegalTransition):
            m.update("b", any_link_up=False)
    finally:
        membership._TRANSITIONS[NodeState.UP] = saved
