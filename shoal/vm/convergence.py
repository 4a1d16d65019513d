"""Convergence policy as data: what to do when a live migration stops making progress.

A pre-copy migration sends RAM while the guest keeps running, then sends what the guest
dirtied meanwhile, pass after pass ("iterations": QEMU's ``dirty-sync-count``), until
what is left fits in the downtime limit at the measured bandwidth; then it stops the
guest and sends the rest. A guest that dirties memory as fast as the link carries it
never gets there. The *ladder* says what to try then, one step per stall, in order
(after VDSM's convergence schedule)::

    start        downtime limit = MigrationSettings.downtime_ms (100 ms by default)
    stall 1      {"action": "downtime", "ms": 200}
    stall 2      {"action": "downtime", "ms": 500}
    stall 3      {"action": "auto-converge", "initial_pct": 20, "increment_pct": 10}
    stall 4      {"action": "postcopy"}      skipped unless the VM allows post-copy
    stall 5      {"action": "abort"}

In the config the ladder is that list of mappings (:meth:`Ladder.from_config`; every
mistake is reported as one sentence naming the step). ``auto-converge`` throttles the
guest's CPUs from ``initial_pct`` and QEMU raises the throttle by ``increment_pct`` each
pass that is still too dirty. ``postcopy`` switches the guest to the destination at once
and fetches the rest of its memory on demand: it always finishes, but from then on a
broken link loses the VM, so it is only taken when the VM allows it.

Progress is judged at pass boundaries: the first sample of each new pass tells how much
the previous pass left dirty. Progress *stalls* when that amount has not dropped below
the best seen for ``stall_iterations`` passes, or ``stall_s`` seconds have gone by
without a new best (long passes at a low bandwidth). The first pass (the bulk copy of
all RAM) is never judged. After each step the count starts again, so every step gets
its full chance. A total time bound aborts whatever the ladder says, unless post-copy
has started (aborting then would lose the VM).

:class:`Convergence` is the pure state machine: the migration engine feeds it
``query-migrate`` samples and carries out the :class:`Decision` it returns; it does no
I/O and reads no clock, so it is tested with made-up samples.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.vm.errors import MigrationConfigError

MiB = 1 << 20
#: QEMU 7.2 accepts a downtime limit up to 2000 s
MAX_DOWNTIME_MS = 2_000_000
DEFAULT_STALL_ITERATIONS = 3
DEFAULT_STALL_S = 30.0


class Action(enum.Enum):
    """Ladder actions; the values are the names the config uses and must never change."""

    DOWNTIME = "downtime"
    AUTO_CONVERGE = "auto-converge"
    POSTCOPY = "postcopy"
    ABORT = "abort"


_KEYS: dict[Action, tuple[str, ...]] = {
    Action.DOWNTIME: ("ms",),
    Action.AUTO_CONVERGE: ("initial_pct", "increment_pct"),
    Action.POSTCOPY: (),
    Action.ABORT: (),
}


@dataclass(frozen=True)
class Step:
    """One rung. ``downtime_ms`` is for DOWNTIME; the throttle percentages for AUTO_CONVERGE."""

    action: Action
    downtime_ms: int = 0
    initial_pct: int = 20
    increment_pct: int = 10

    def describe(self) -> str:
        if self.action is Action.DOWNTIME:
            return f"downtime {self.downtime_ms} ms"
        if self.action is Action.AUTO_CONVERGE:
            return f"auto-converge (CPU throttle {self.initial_pct}% + {self.increment_pct}% a pass)"
        return self.action.value

    def to_config(self) -> dict[str, Any]:
        if self.action is Action.DOWNTIME:
            return {"action": self.action.value, "ms": self.downtime_ms}
        if self.action is Action.AUTO_CONVERGE:
            return {"action": self.action.value, "initial_pct": self.initial_pct,
                    "increment_pct": self.increment_pct}
        return {"action": self.action.value}


@dataclass(frozen=True)
class Ladder:
    """Steps taken one per stall; see the module docstring for what a stall is."""

    steps: tuple[Step, ...]
    stall_iterations: int = DEFAULT_STALL_ITERATIONS
    stall_s: float = DEFAULT_STALL_S

    def __post_init__(self) -> None:
        if not isinstance(self.stall_iterations, int) or self.stall_iterations < 1:
            raise MigrationConfigError(
                f"the ladder's stall_iterations must be a whole number of passes, at least 1, "
                f"not {self.stall_iterations!r}.")
        if not isinstance(self.stall_s, int | float) or self.stall_s <= 0:
            raise MigrationConfigError(
                f"the ladder's stall_s must be a positive number of seconds, not {self.stall_s!r}.")
        _check_order(self.steps)

    @classmethod
    def from_config(
        cls,
        items: Any,
        *,
        stall_iterations: int = DEFAULT_STALL_ITERATIONS,
        stall_s: float = DEFAULT_STALL_S,
    ) -> Ladder:
        """Parse the config form, a list of mappings with an ``action`` key."""
        if not isinstance(items, list | tuple):
            raise MigrationConfigError(
                "the convergence ladder must be a list of steps such as "
                '[{"action": "downtime", "ms": 200}, {"action": "abort"}], '
                f"not {type(items).__name__} {items!r}.")
        steps = tuple(_parse_step(i, item) for i, item in enumerate(items, 1))
        return cls(steps, stall_iterations=stall_iterations, stall_s=stall_s)

    def to_config(self) -> list[dict[str, Any]]:
        return [s.to_config() for s in self.steps]

    def has(self, action: Action) -> bool:
        return any(s.action is action for s in self.steps)

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.steps) or "no steps"


def _parse_step(n: int, item: Any) -> Step:
    if not isinstance(item, Mapping) or "action" not in item:
        raise MigrationConfigError(
            f'ladder step {n} must be a mapping with an "action" key, such as '
            f'{{"action": "abort"}}, not {item!r}.')
    names = ", ".join(a.value for a in Action)
    try:
        action = Action(item["action"])
    except (ValueError, TypeError):
        raise MigrationConfigError(
            f"ladder step {n} has action {item['action']!r}; use one of {names}.") from None
    allowed = _KEYS[action]
    for key in item:
        if key != "action" and key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no parameters"
            raise MigrationConfigError(f"ladder step {n} ({action.value}) has unknown key {key!r}; {takes}.")
    if action is Action.DOWNTIME:
        if "ms" not in item:
            raise MigrationConfigError(f'ladder step {n} (downtime) needs "ms", the new downtime limit.')
        return Step(action, downtime_ms=_int(n, action, "ms", item["ms"], 1, MAX_DOWNTIME_MS, "milliseconds"))
    if action is Action.AUTO_CONVERGE:
        return Step(action,
                    initial_pct=_int(n, action, "initial_pct", item.get("initial_pct", 20), 1, 99, "percent"),
                    increment_pct=_int(n, action, "increment_pct", item.get("increment_pct", 10), 1, 99, "percent"))
    return Step(action)


def _int(n: int, action: Action, key: str, value: Any, lo: int, hi: int, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MigrationConfigError(
            f"ladder step {n} ({action.value}): {key} must be a whole number of {unit} "
            f"from {lo} to {hi}, not {value!r}.")
    return value


def _check_order(steps: Sequence[Step]) -> None:
    seen: dict[Action, int] = {}
    last_downtime: tuple[int, int] | None = None  # (step, ms)
    for n, step in enumerate(steps, 1):
        if step.action is Action.ABORT and n != len(steps):
            raise MigrationConfigError(
                f"ladder step {n} is abort but {len(steps) - n} more step(s) follow it, which could "
                "never run; put abort last.")
        if step.action in (Action.AUTO_CONVERGE, Action.POSTCOPY) and step.action in seen:
            raise MigrationConfigError(
                f"ladder step {n} repeats {step.action.value} (already step {seen[step.action]}); "
                "once on, it stays on for the rest of the migration.")
        if step.action is Action.DOWNTIME:
            if last_downtime is not None and step.downtime_ms <= last_downtime[1]:
                raise MigrationConfigError(
                    f"ladder step {n} sets the downtime limit to {step.downtime_ms} ms after "
                    f"{last_downtime[1]} ms in step {last_downtime[0]}; each downtime step must raise it.")
            last_downtime = (n, step.downtime_ms)
        seen.setdefault(step.action, n)


DEFAULT_LADDER = Ladder((
    Step(Action.DOWNTIME, downtime_ms=200),
    Step(Action.DOWNTIME, downtime_ms=500),
    Step(Action.AUTO_CONVERGE),
    Step(Action.POSTCOPY),
    Step(Action.ABORT),
))


# ---- the state machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """What one ``query-migrate`` said, in the units the policy uses."""

    elapsed_s: float
    #: RAM dirty-sync-count: 1 during the first (bulk) pass, +1 at each later pass
    iteration: int
    remaining_bytes: int
    #: how fast the guest dirtied memory over the last pass (0 until the first pass ends)
    dirty_rate_bytes_s: float = 0.0
    #: what QEMU actually sent, bytes per second
    throughput_bytes_s: float = 0.0


@dataclass(frozen=True)
class Decision:
    """Carry out ``step`` now; ``reason`` is the sentence to log and report."""

    step: Step
    reason: str


class Phase(enum.Enum):
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    ABORTED = "aborted"


class Convergence:
    """Feeds on samples, answers with the next step (or None). Pure: no I/O, no clock.

    Safety: once it has decided POSTCOPY it never decides anything again, in particular
    never ABORT, because cancelling a post-copy migration loses the VM."""

    def __init__(
        self,
        ladder: Ladder,
        *,
        initial_downtime_ms: int,
        total_timeout_s: float,
        bandwidth_cap_bytes_s: float,
        allow_postcopy: bool,
    ) -> None:
        self.ladder = ladder
        self.initial_downtime_ms = initial_downtime_ms
        self.total_timeout_s = total_timeout_s
        self.bandwidth_cap_bytes_s = bandwidth_cap_bytes_s
        self.allow_postcopy = allow_postcopy
        self.phase = Phase.PRECOPY
        #: steps carried out, in order (the initial downtime is not one)
        self.taken: list[Step] = []
        #: steps passed over, with why
        self.skipped: list[tuple[Step, str]] = []
        self._next = 0
        self._pass = 0
        self._pass_dirty = 0
        self._best: int | None = None
        self._mark_pass = 0
        self._mark_s = 0.0
        self._last: Sample | None = None

    def start(self) -> Decision:
        return Decision(Step(Action.DOWNTIME, downtime_ms=self.initial_downtime_ms),
                        f"starting with a {self.initial_downtime_ms} ms downtime limit")

    def observe(self, sample: Sample) -> Decision | None:
        if self.phase is not Phase.PRECOPY:
            return None
        self._last = sample
        if sample.elapsed_s >= self.total_timeout_s:
            return self._abort(f"did not converge within {self.total_timeout_s:g} s: {self.diagnose(sample)}")
        if sample.iteration < 2:
            return None  # the bulk copy: always progress
        if sample.iteration != self._pass:  # the first sample of a pass: what the last one left
            self._pass = sample.iteration
            self._pass_dirty = sample.remaining_bytes
            if self._best is None or sample.remaining_bytes < self._best:
                self._best = sample.remaining_bytes
                self._mark_pass, self._mark_s = sample.iteration, sample.elapsed_s
        passes = sample.iteration - self._mark_pass
        idle_s = sample.elapsed_s - self._mark_s
        if passes < self.ladder.stall_iterations and idle_s < self.ladder.stall_s:
            return None
        why = (f"no progress for {passes} passes" if passes >= self.ladder.stall_iterations
               else f"no progress for {idle_s:.0f} s")
        return self._climb(sample, why)

    def _climb(self, sample: Sample, why: str) -> Decision | None:
        while self._next < len(self.ladder.steps):
            step = self.ladder.steps[self._next]
            self._next += 1
            if step.action is Action.POSTCOPY and not self.allow_postcopy:
                self.skipped.append((step, "the VM does not allow post-copy"))
                continue
            self._mark_pass, self._mark_s = sample.iteration, sample.elapsed_s
            stalled = f"{why} ({_mib(self._pass_dirty)} dirty again at pass {sample.iteration})"
            if step.action is Action.ABORT:
                return self._abort(f"did not converge after trying {self._tried()}: {self.diagnose(sample)}")
            self.taken.append(step)
            if step.action is Action.POSTCOPY:
                self.phase = Phase.POSTCOPY
                return Decision(step, f"{stalled}: switching to post-copy")
            if step.action is Action.AUTO_CONVERGE:
                return Decision(step, f"{stalled}: throttling the guest's CPUs from "
                                      f"{step.initial_pct}% up by {step.increment_pct}% a pass")
            return Decision(step, f"{stalled}: raising the downtime limit to {step.downtime_ms} ms")
        # the ladder is spent without an abort: wait for the total time bound
        self._mark_pass, self._mark_s = sample.iteration, sample.elapsed_s
        return None

    def _abort(self, reason: str) -> Decision:
        self.phase = Phase.ABORTED
        return Decision(Step(Action.ABORT), reason)

    def _tried(self) -> str:
        tried = [f"downtime {self.initial_downtime_ms} ms"] + [s.describe() for s in self.taken]
        return ", ".join(tried)

    def diagnose(self, sample: Sample | None = None) -> str:
        """Why a migration does not converge, as a clause: the guest's dirty rate against
        the bandwidth cap and what QEMU really sent."""
        s = sample or self._last
        if s is None:
            return "no pass finished yet"
        cap = self.bandwidth_cap_bytes_s
        dirty = s.dirty_rate_bytes_s
        passes = f"after {s.iteration} iteration{'s' if s.iteration != 1 else ''}"
        if s.iteration < 2 or dirty <= 0:
            return (f"the first copy of RAM had not finished {passes}; "
                    f"{_mib(s.remaining_bytes)} were left at {_rate(s.throughput_bytes_s)}")
        sent = s.throughput_bytes_s
        if dirty > 1.05 * cap:
            return f"the guest dirties {_rate(dirty)}, more than the {_rate(cap)} bandwidth cap, {passes}"
        if dirty >= 0.7 * cap:
            # QEMU measures dirtying per pass, so a saturated link shows up as "about equal"
            return (f"the guest dirties {_rate(dirty)}, about as much as the {_rate(cap)} bandwidth cap "
                    f"carries, {passes}")
        if 0 < sent < 0.7 * cap and dirty >= 0.7 * sent:
            return (f"the guest dirties {_rate(dirty)} and the link carried only {_rate(sent)} of the "
                    f"{_rate(cap)} bandwidth cap, {passes}")
        return (f"each pass still left {_mib(self._pass_dirty or s.remaining_bytes)} dirty, more than the "
                f"downtime limit lets through; the guest dirties {_rate(dirty)} against the {_rate(cap)} "
                f"bandwidth cap, {passes}")


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _rate(bytes_s: float) -> str:
    value = bytes_s / MiB
    return f"{value:.0f} MiB/s" if value >= 10 else f"{value:.1f} MiB/s"
