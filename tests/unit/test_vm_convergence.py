"""The convergence ladder: parsing with sentences, and the stall state machine fed with
made-up query-migrate samples."""

from __future__ import annotations

import pytest

from shoal.vm.convergence import (
    DEFAULT_LADDER,
    Action,
    Convergence,
    Decision,
    Ladder,
    Phase,
    Sample,
    Step,
)
from shoal.vm.errors import MigrationConfigError

MiB = 1 << 20


def machine(ladder: Ladder, *, allow_postcopy: bool = False, total_timeout_s: float = 600,
            cap_mib_s: float = 64) -> Convergence:
    return Convergence(ladder, initial_downtime_ms=100, total_timeout_s=total_timeout_s,
                       bandwidth_cap_bytes_s=cap_mib_s * MiB, allow_postcopy=allow_postcopy)


def feed(conv: Convergence, samples: list[Sample]) -> list[tuple[int, Decision]]:
    """Every decision, with the index of the sample that caused it."""
    out = []
    for i, s in enumerate(samples):
        d = conv.observe(s)
        if d is not None:
            out.append((i, d))
    return out


def stuck(passes: int, *, remaining_mib: float = 40, dirty_mib_s: float = 80, start_s: float = 10,
          pass_s: float = 1.0, first_pass: int = 2) -> list[Sample]:
    """Pass boundaries of a guest that leaves the same amount dirty every pass."""
    return [Sample(start_s + k * pass_s, first_pass + k, int(remaining_mib * MiB), dirty_mib_s * MiB, 64 * MiB)
            for k in range(passes)]


LADDER = Ladder.from_config([
    {"action": "downtime", "ms": 200},
    {"action": "downtime", "ms": 500},
    {"action": "auto-converge", "initial_pct": 30, "increment_pct": 20},
    {"action": "postcopy"},
    {"action": "abort"},
], stall_iterations=3, stall_s=1000)


def test_start_sets_the_initial_downtime() -> None:
    d = machine(LADDER).start()
    assert d.step == Step(Action.DOWNTIME, downtime_ms=100)
    assert d.reason == "starting with a 100 ms downtime limit"


def test_bulk_pass_is_never_judged() -> None:
    conv = machine(LADDER)
    samples = [Sample(t * 0.1, 1, (500 - t) * MiB, 0, 64 * MiB) for t in range(200)]
    assert feed(conv, samples) == []


def test_progress_resets_the_stall_count() -> None:
    conv = machine(LADDER)
    shrinking = [Sample(10 + k, 2 + k, (100 - 10 * k) * MiB, 10 * MiB, 64 * MiB) for k in range(9)]
    assert feed(conv, shrinking) == []


def test_only_the_first_sample_of_a_pass_counts() -> None:
    """Within a pass, remaining falls as pages go out; that is not progress."""
    conv = machine(LADDER)
    samples = []
    for k in range(4):
        for j in range(10):
            samples.append(Sample(10 + k + j / 10, 2 + k, (40 - 4 * j) * MiB, 80 * MiB, 64 * MiB))
    decisions = feed(conv, samples)
    assert [(i, d.step) for i, d in decisions] == [(30, Step(Action.DOWNTIME, downtime_ms=200))]


def test_stall_climbs_one_step_per_stall_and_skips_postcopy() -> None:
    conv = machine(LADDER, allow_postcopy=False)
    decisions = feed(conv, stuck(20))
    assert [(i, d.step.action, d.step.downtime_ms) for i, d in decisions] == [
        (3, Action.DOWNTIME, 200),
        (6, Action.DOWNTIME, 500),
        (9, Action.AUTO_CONVERGE, 0),
        (12, Action.ABORT, 0),
    ]
    assert decisions[0][1].reason == (
        "no progress for 3 passes (40.0 MiB dirty again at pass 5): raising the downtime limit to 200 ms")
    assert decisions[2][1].reason.endswith("throttling the guest's CPUs from 30% up by 20% a pass")
    assert [s.action for s, _ in conv.skipped] == [Action.POSTCOPY]
    assert conv.phase is Phase.ABORTED
    assert feed(conv, stuck(5, start_s=100, first_pass=30)) == []


def test_abort_reason_names_the_dirty_rate_and_the_cap() -> None:
    conv = machine(LADDER, cap_mib_s=64)
    abort = feed(conv, stuck(20, dirty_mib_s=80))[-1][1]
    assert abort.step.action is Action.ABORT
    assert abort.reason == (
        "did not converge after trying downtime 100 ms, downtime 200 ms, downtime 500 ms, "
        "auto-converge (CPU throttle 30% + 20% a pass): the guest dirties 80 MiB/s, "
        "more than the 64 MiB/s bandwidth cap, after 14 iterations")


def test_postcopy_taken_when_allowed_and_then_nothing_more() -> None:
    conv = machine(LADDER, allow_postcopy=True, total_timeout_s=30)
    decisions = feed(conv, stuck(40))
    assert [d.step.action for _, d in decisions] == [
        Action.DOWNTIME, Action.DOWNTIME, Action.AUTO_CONVERGE, Action.POSTCOPY]
    assert decisions[-1][1].reason.endswith("switching to post-copy")
    assert conv.phase is Phase.POSTCOPY  # the total bound (30 s) passed: still no abort


def test_time_bound_stall_for_long_passes() -> None:
    ladder = Ladder.from_config([{"action": "downtime", "ms": 300}, {"action": "abort"}],
                                stall_iterations=3, stall_s=5)
    conv = machine(ladder)
    samples = [Sample(10 + 0.5 * k, 2, int(30 * MiB - k * MiB), 8 * MiB, 8 * MiB) for k in range(25)]
    decisions = feed(conv, samples)
    assert decisions[0][0] == 10  # 5 s after pass 2 began, still inside it
    assert decisions[0][1].reason.startswith("no progress for 5 s")
    assert decisions[1][0] == 20 and decisions[1][1].step.action is Action.ABORT


def test_total_timeout_aborts_with_a_reason() -> None:
    conv = machine(Ladder(()), total_timeout_s=12, cap_mib_s=1)
    samples = [Sample(t, 1, (90 - t) * MiB, 0, 1 * MiB) for t in range(0, 13)]
    decisions = feed(conv, samples)
    assert len(decisions) == 1
    i, d = decisions[0]
    assert i == 12 and d.step.action is Action.ABORT
    assert d.reason == ("did not converge within 12 s: the first copy of RAM had not finished after "
                        "1 iteration; 78.0 MiB were left at 1.0 MiB/s")


def test_empty_ladder_waits_for_the_total_bound() -> None:
    conv = machine(Ladder((), stall_iterations=1), total_timeout_s=20)
    decisions = feed(conv, stuck(15))
    assert [(i, d.step.action) for i, d in decisions] == [(10, Action.ABORT)]
    assert "within 20 s" in decisions[0][1].reason


def test_default_ladder_round_trips() -> None:
    assert Ladder.from_config(DEFAULT_LADDER.to_config()) == DEFAULT_LADDER
    assert DEFAULT_LADDER.describe() == (
        "downtime 200 ms, downtime 500 ms, auto-converge (CPU throttle 20% + 10% a pass), postcopy, abort")


@pytest.mark.parametrize("config, sentence", [
    ({"action": "abort"}, "the convergence ladder must be a list of steps"),
    (["abort"], 'ladder step 1 must be a mapping with an "action" key'),
    ([{"action": "postcopyy"}], "ladder step 1 has action 'postcopyy'; use one of downtime, auto-converge, postcopy, abort."),
    ([{"action": "downtime"}], 'ladder step 1 (downtime) needs "ms", the new downtime limit.'),
    ([{"action": "downtime", "ms": "200ms"}], "ladder step 1 (downtime): ms must be a whole number of milliseconds from 1 to 2000000, not '200ms'."),
    ([{"action": "downtime", "msec": 200}], "ladder step 1 (downtime) has unknown key 'msec'; it takes ms."),
    ([{"action": "abort", "now": True}], "ladder step 1 (abort) has unknown key 'now'; it takes no parameters."),
    ([{"action": "downtime", "ms": 500}, {"action": "downtime", "ms": 200}],
     "ladder step 2 sets the downtime limit to 200 ms after 500 ms in step 1; each downtime step must raise it."),
    ([{"action": "abort"}, {"action": "postcopy"}],
     "ladder step 1 is abort but 1 more step(s) follow it, which could never run; put abort last."),
    ([{"action": "auto-converge"}, {"action": "auto-converge", "initial_pct": 50}],
     "ladder step 2 repeats auto-converge (already step 1)"),
    ([{"action": "auto-converge", "increment_pct": 0}],
     "ladder step 1 (auto-converge): increment_pct must be a whole number of percent from 1 to 99, not 0."),
])
def test_bad_ladder_config_is_one_sentence(config: object, sentence: str) -> None:
    with pytest.raises(MigrationConfigError) as info:
        Ladder.from_config(config)
    assert sentence in str(info.value)
    assert str(info.value).endswith(".")


def test_bad_stall_settings_are_sentences() -> None:
    with pytest.raises(MigrationConfigError, match="stall_iterations must be a whole number"):
        Ladder.from_config([], stall_iterations=0)
    with pytest.raises(MigrationConfigError, match="stall_s must be a positive number of seconds"):
        Ladder.from_config([], stall_s=-1)
