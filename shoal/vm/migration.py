"""QEMU-level live migration and quick migration (save/restore), without cluster logic.

Two QEMU processes, one VM. The destination was started from the same
:class:`~shoal.vm.qemu.MachineSpec` with ``incoming=True, start_paused=True``
(``-incoming defer -S``). The QMP sequence, destination then source::

    destination  migrate-set-capabilities  events, late-block-activate [, postcopy-ram]
                 migrate-incoming uri=tcp:HOST:PORT     (prepare_incoming)
    source       migrate-set-capabilities  events, pause-before-switchover,
                                           auto-converge?, postcopy-ram?
                 migrate-set-parameters    max-bandwidth, downtime-limit [, throttle]
                 migrate uri=tcp:HOST:PORT
                 query-migrate  every poll_interval_s and at each MIGRATION event,
                                feeding the convergence ladder, which may send
                                migrate-set-parameters / migrate-start-postcopy / migrate_cancel
                 ... status pre-switchover: the guest is stopped and its disks flushed;
                     await on_switchover()    (raises: migrate_cancel, source resumes)
                 migrate-continue state=pre-switchover
                 ... status completed: the source is in postmigrate, its disks inactive
    destination  ... status completed (wait_incoming): paused, disks not yet opened
    caller       COMMIT POINT: record the new owner, then ``cont`` on the destination.
                 Until then the source can still take the VM back: ``cont`` on it
                 (:func:`resume_source`) reopens its disks and runs it again.

What QEMU 7.2 allows while a migration runs: ``migrate-set-parameters`` (downtime
limit, bandwidth, CPU throttle) yes; ``migrate-set-capabilities`` no ("There's a
migration process in progress"). So ``auto-converge`` and ``postcopy-ram`` are switched
on before ``migrate`` when the ladder may need them. Auto-converge is kept dormant until
its step by ``max-cpu-throttle=1`` (QEMU throttles by at most 1% if it decides to), and
woken by raising it to 99 with the step's initial/increment. Post-copy costs nothing
until ``migrate-start-postcopy``.

Failures. Before pre-switchover's hook returns, everything is rolled back: the engine
sends ``migrate_cancel`` (unless QEMU already failed), waits for QEMU to settle, and
checks the source runs again (QEMU 7.2 restarts a guest it stopped for the migration;
``cont`` is sent if it did not), then raises. The destination QEMU exits by itself when
its stream breaks; the caller kills it anyway. Once post-copy has started nothing is
cancelled (the guest's memory is split between the two sides); a failure then raises
``MigrationError(phase="postcopy")`` and leaves both QEMUs as they are.

Phases in :class:`MigrationError`: ``prepare`` (capabilities, parameters, ``migrate``
refused), ``transfer`` (pre-copy), ``switchover`` (the hook refused, or the final
stop-and-copy failed), ``postcopy``, ``save`` and ``load`` (quick migration).
:class:`MigrationAborted` is the ladder giving up, with its reason.

Quick migration (QEMU 7.2 has no ``file:`` URI): :func:`save_state` stops the guest and
migrates it into ``exec:COMMAND`` (the command reads the stream on stdin); a new QEMU
started with ``incoming=True`` loads it with :func:`load_state` from ``exec:COMMAND``
(the command writes the stream on stdout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.vm.convergence import (
    DEFAULT_LADDER,
    MAX_DOWNTIME_MS,
    Action,
    Convergence,
    Decision,
    Ladder,
    Sample,
)
from shoal.vm.errors import (
    MigrationAborted,
    MigrationConfigError,
    MigrationError,
    QemuError,
    QemuExited,
)
from shoal.vm.qemu import EventSubscription, Qemu, QmpEvent

log = logging.getLogger(__name__)

MiB = 1 << 20
#: source statuses of a migration that is still under way
_UNDER_WAY = {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug",
              "postcopy-active", "postcopy-paused", "postcopy-recover"}
_POSTCOPY = {"postcopy-active", "postcopy-paused", "postcopy-recover"}
#: auto-converge switched on but kept asleep until its ladder step
_DORMANT_THROTTLE = {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}
#: max-bandwidth for saving into a local pipe: as fast as QEMU can write
QUICK_MAX_BANDWIDTH = 1 << 40
_PROGRESS_WAIT_S = 0.5
#: QEMU 7.2 says "completed" a moment before it has filled in total-time and downtime
_FIGURES_WAIT_S = 2.0

OnSwitchover = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class MigrationSettings:
    """How one live migration runs. Relations checked when made:
    poll_interval_s < ladder.stall_s < total_timeout_s, and every downtime step of the
    ladder above ``downtime_ms``."""

    #: QEMU's own default (128 MiB/s) is never left in place
    max_bandwidth_mib_s: int = 1024
    #: the initial downtime limit; the ladder raises it
    downtime_ms: int = 100
    allow_postcopy: bool = False
    ladder: Ladder = DEFAULT_LADDER
    total_timeout_s: float = 300.0
    poll_interval_s: float = 0.1
    #: how long on_switchover may keep the stopped guest waiting, and how long the final
    #: stop-and-copy may take after it
    switchover_timeout_s: float = 30.0
    #: how long QEMU may take to settle after migrate_cancel
    cancel_timeout_s: float = 10.0
    #: a pre-copy that sends nothing for this long is given up: the stream is stuck
    #: (a cut network leaves TCP retrying for many minutes)
    stuck_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.max_bandwidth_mib_s, bool) or not isinstance(self.max_bandwidth_mib_s, int) \
                or not 1 <= self.max_bandwidth_mib_s <= 1 << 20:
            raise MigrationConfigError(
                f"max_bandwidth_mib_s must be a whole number of MiB/s from 1 to {1 << 20}, "
                f"not {self.max_bandwidth_mib_s!r}.")
        if isinstance(self.downtime_ms, bool) or not isinstance(self.downtime_ms, int) \
                or not 1 <= self.downtime_ms <= MAX_DOWNTIME_MS:
            raise MigrationConfigError(
                f"downtime_ms must be a whole number of milliseconds from 1 to {MAX_DOWNTIME_MS}, "
                f"not {self.downtime_ms!r}.")
        for n, step in enumerate(self.ladder.steps, 1):
            if step.action is Action.DOWNTIME and step.downtime_ms <= self.downtime_ms:
                raise MigrationConfigError(
                    f"ladder step {n} sets the downtime limit to {step.downtime_ms} ms, not above the "
                    f"initial {self.downtime_ms} ms (downtime_ms); each downtime step must raise it.")
        for name in ("total_timeout_s", "poll_interval_s", "switchover_timeout_s", "cancel_timeout_s", "stuck_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise MigrationConfigError(f"{name} must be a positive number of seconds, not {value!r}.")
        if not self.poll_interval_s < self.ladder.stall_s < self.total_timeout_s:
            raise MigrationConfigError(
                f"the timings do not fit: poll_interval_s ({self.poll_interval_s:g}) < the ladder's "
                f"stall_s ({self.ladder.stall_s:g}) < total_timeout_s ({self.total_timeout_s:g}) must hold, "
                "or the ladder would never get a chance to act before the migration is given up.")
        if not self.poll_interval_s < self.stuck_s:
            raise MigrationConfigError(f"stuck_s ({self.stuck_s:g}) must be longer than poll_interval_s "
                                       f"({self.poll_interval_s:g}).")

    @classmethod
    def from_config(cls, doc: Mapping[str, Any]) -> MigrationSettings:
        """From a config mapping: the field names, with ``ladder`` as a list of steps and
        ``stall_iterations``/``stall_s`` beside it."""
        known = {"max_bandwidth_mib_s", "downtime_ms", "allow_postcopy", "ladder", "stall_iterations",
                 "stall_s", "total_timeout_s", "poll_interval_s", "switchover_timeout_s", "cancel_timeout_s"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise MigrationConfigError(
                f"unknown migration setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        args = {k: v for k, v in doc.items() if k not in ("ladder", "stall_iterations", "stall_s")}
        if any(k in doc for k in ("ladder", "stall_iterations", "stall_s")):
            args["ladder"] = Ladder.from_config(
                doc.get("ladder", DEFAULT_LADDER.to_config()),
                stall_iterations=doc.get("stall_iterations", DEFAULT_LADDER.stall_iterations),
                stall_s=doc.get("stall_s", DEFAULT_LADDER.stall_s))
        return cls(**args)

    @property
    def max_bandwidth_bytes_s(self) -> int:
        return self.max_bandwidth_mib_s * MiB

    @property
    def uses_postcopy(self) -> bool:
        """Both sides switch postcopy-ram on before the migration starts."""
        return self.allow_postcopy and self.ladder.has(Action.POSTCOPY)


@dataclass(frozen=True)
class MigrationStats:
    """What QEMU measured (``*_ms``, bytes, iterations, mbps: QEMU's Mbit/s) plus what
    shoal measured: ``stopped_at`` is ``time.monotonic()`` when the source's STOP event
    arrived, so the caller can measure the end-to-end downtime up to its ``cont``."""

    total_time_ms: int
    downtime_ms: int
    setup_time_ms: int
    transferred_bytes: int
    iterations: int
    mbps: float
    started_at: float
    stopped_at: float | None
    completed_at: float
    postcopy: bool = False
    #: the ladder's sentences, in order
    steps: tuple[str, ...] = ()
    #: how long on_switchover kept the stopped guest waiting
    switchover_hook_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Progress:
    """One look at a running migration, for progress bars and logs."""

    status: str
    elapsed_s: float
    ram_total_bytes: int
    transferred_bytes: int
    remaining_bytes: int
    iteration: int
    dirty_rate_bytes_s: float
    throughput_bytes_s: float
    cpu_throttle_pct: int
    downtime_limit_ms: int
    steps: tuple[str, ...] = field(default=())


OnProgress = Callable[[Progress], None]


# ---- helpers ---------------------------------------------------------------------------------


async def _set_capabilities(vm: Qemu, caps: Mapping[str, bool]) -> None:
    await vm.execute("migrate-set-capabilities",
                     {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})


def _sample(info: Mapping[str, Any], elapsed_s: float) -> Sample:
    ram = info.get("ram") or {}
    page = int(ram.get("page-size") or 4096)
    return Sample(
        elapsed_s=elapsed_s,
        iteration=int(ram.get("dirty-sync-count") or 0),
        remaining_bytes=int(ram.get("remaining") or 0),
        dirty_rate_bytes_s=float(ram.get("dirty-pages-rate") or 0) * page,
        throughput_bytes_s=float(ram.get("mbps") or 0) * 1e6 / 8,
    )


def _error_desc(info: Mapping[str, Any]) -> str:
    return str(info.get("error-desc") or "QEMU gave no reason")


async def _wait_status(vm: Qemu, sub_wait_s: float, done: Callable[[str], bool],
                       events: EventSubscription, timeout_s: float) -> Mapping[str, Any]:
    """Poll query-migrate (waking early on MIGRATION events) until ``done(status)``."""
    async with asyncio.timeout(timeout_s):
        while True:
            info = await vm.execute("query-migrate")
            if done(str(info.get("status", "none"))):
                return dict(info)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sub_wait_s):
                    await events.get()


async def _final_figures(vm: Qemu, info: Mapping[str, Any]) -> Mapping[str, Any]:
    """The completed query-migrate answer once QEMU has written its figures into it."""
    deadline = time.monotonic() + _FIGURES_WAIT_S
    while not info.get("total-time") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        info = await vm.execute("query-migrate")
    return info


async def resume_source(src: Qemu, *, why: str) -> bool:
    """Make sure the guest runs on ``src`` again after a migration that will not be
    committed (failed, cancelled, or completed but rolled back: ``cont`` reopens the
    disks a completed migration released). True when shoal had to send ``cont``."""
    status = await src.status()
    if status == "running":
        return False
    log.warning("VM %s: guest is %s on the source after %s; sending cont", src.name, status, why)
    await src.cont()
    return True


# ---- destination ---------------------------------------------------------------------------


async def prepare_incoming(dst: Qemu, listen_uri: str, settings: MigrationSettings) -> str:
    """Make ``dst`` (started with ``incoming=True, start_paused=True``) listen on
    ``listen_uri``; return the URI the source must use (``tcp:HOST:0`` becomes the port
    QEMU picked)."""
    try:
        status = await dst.status()
        if status != "inmigrate" or "-S" not in dst.argv:
            raise MigrationError(
                f"QEMU for VM {dst.name} is {status}{'' if '-S' in dst.argv else ' without -S'}, not "
                "waiting paused for a migration; start it with incoming=True, start_paused=True.",
                phase="prepare")
        # late-block-activate: the destination opens the disks at `cont`, the commit
        # point, not when the stream ends; until then the source may still take them back
        await _set_capabilities(dst, {"events": True, "late-block-activate": True,
                                      "postcopy-ram": settings.uses_postcopy})
        await dst.execute("migrate-incoming", {"uri": listen_uri})
        if not listen_uri.startswith("tcp:"):
            return listen_uri
        info = await dst.execute("query-migrate")
    except QemuError as err:
        raise MigrationError(f"VM {dst.name} cannot receive a migration on {listen_uri}: {err}",
                             phase="prepare", reason=str(err)) from err
    for addr in info.get("socket-address") or []:
        if addr.get("type") == "inet":
            host = addr["host"]
            return f"tcp:[{host}]:{addr['port']}" if ":" in host else f"tcp:{host}:{addr['port']}"
    return listen_uri


async def wait_incoming(dst: Qemu) -> Mapping[str, Any]:
    """Wait until ``dst`` has received the whole VM (it stays paused; ``cont`` is the
    caller's commit). Bound it with ``asyncio.timeout``; a destination QEMU that fails
    or exits raises MigrationError."""
    with dst.subscribe("MIGRATION") as events:
        try:
            info = await _wait_status(dst, _PROGRESS_WAIT_S,
                                      lambda s: s in ("completed", "failed", "cancelled"),
                                      events, float("inf"))
        except QemuError as err:
            raise MigrationError(f"VM {dst.name} was not received: {err}", phase="transfer",
                                 reason=str(err)) from err
    if info.get("status") != "completed":
        raise MigrationError(f"VM {dst.name} was not received: {_error_desc(info)}.",
                             phase="transfer", reason=_error_desc(info))
    return info


# ---- source ----------------------------------------------------------------------------------


async def run_live_migration(
    src: Qemu,
    uri: str,
    settings: MigrationSettings,
    on_switchover: OnSwitchover,
    *,
    on_progress: OnProgress | None = None,
) -> MigrationStats:
    """Migrate the guest of ``src`` to the QEMU listening on ``uri`` (see the module
    docstring for the sequence and the failure rules). Returns when the source reports
    ``completed``; the source guest is then stopped (postmigrate)."""
    return await _SourceRun(src, uri, settings, on_switchover, on_progress).run()


class _SourceRun:
    """One outgoing migration: prepare, drive, switch over, or roll back."""

    def __init__(self, src: Qemu, uri: str, settings: MigrationSettings,
                 on_switchover: OnSwitchover, on_progress: OnProgress | None) -> None:
        self.src = src
        self.uri = uri
        self.settings = settings
        self.on_switchover = on_switchover
        self.on_progress = on_progress
        self.conv = Convergence(settings.ladder, initial_downtime_ms=settings.downtime_ms,
                                total_timeout_s=settings.total_timeout_s,
                                bandwidth_cap_bytes_s=settings.max_bandwidth_bytes_s,
                                allow_postcopy=settings.allow_postcopy)
        self.steps: list[str] = []
        self.was_running = False
        self.started_at = 0.0
        self.stopped_at: float | None = None
        self.switched_at: float | None = None
        self.hook_ms = 0.0
        #: migrate-start-postcopy was sent: the switchover will go to post-copy
        self.postcopy_requested = False
        #: the switchover into post-copy went ahead: from here nothing may be cancelled
        self.postcopy = False
        self.downtime_limit_ms = settings.downtime_ms
        self.throttle_pct = 0
        #: (target %, increment %) while the first throttle bump after waking is under way
        self._throttle_fixup: tuple[int, int] | None = None
        #: (bytes sent, when that count last grew)
        self._moved: tuple[int, float] = (-1, 0.0)

    def _what(self) -> str:
        return f"live migration of VM {self.src.name} to {self.uri}"

    async def run(self) -> MigrationStats:
        await self._prepare()
        with self.src.subscribe(("MIGRATION", "STOP")) as events:
            try:
                await self.src.execute("migrate", {"uri": self.uri})
            except QemuError as err:
                raise MigrationError(f"{self._what()} did not start: {err}", phase="prepare",
                                     reason=str(err)) from err
            self.started_at = time.monotonic()
            log.info("VM %s: migrating to %s (%s)", self.src.name, self.uri, self.conv.start().reason)
            try:
                info = await self._drive(events)
            except BaseException as err:
                if not self.postcopy:
                    await asyncio.shield(self._roll_back(err))
                if isinstance(err, QemuError):  # the source QEMU went away or refused a query
                    raise MigrationError(f"{self._what()} failed {self._where()}: {err}",
                                         phase=self._phase(), reason=str(err)) from err
                raise
            self._drain(events)
        return self._stats(info)

    async def _prepare(self) -> None:
        s = self.settings
        try:
            status = await self.src.status()
            if status not in ("running", "paused"):
                raise MigrationError(f"VM {self.src.name} is {status} here, not running or paused: "
                                     "there is nothing to migrate.", phase="prepare")
            self.was_running = status == "running"
            auto = s.ladder.has(Action.AUTO_CONVERGE)
            await _set_capabilities(self.src, {
                "events": True, "pause-before-switchover": True,
                "auto-converge": auto, "postcopy-ram": s.uses_postcopy})
            params: dict[str, object] = {"max-bandwidth": s.max_bandwidth_bytes_s,
                                         "downtime-limit": s.downtime_ms}
            if auto:
                params.update(_DORMANT_THROTTLE)
            if s.uses_postcopy:
                params["max-postcopy-bandwidth"] = s.max_bandwidth_bytes_s
            await self.src.execute("migrate-set-parameters", params)
        except QemuError as err:
            raise MigrationError(f"{self._what()} could not be prepared: {err}", phase="prepare",
                                 reason=str(err)) from err

    async def _drive(self, events: EventSubscription) -> Mapping[str, Any]:
        """Poll and react until the source says completed; raise on anything else."""
        while True:
            info = await self.src.execute("query-migrate")
            status = str(info.get("status", "none"))
            elapsed = time.monotonic() - self.started_at
            self._drain(events)
            if status == "completed":
                return dict(await _final_figures(self.src, info))
            if status in ("failed", "cancelled"):
                raise MigrationError(
                    f"{self._what()} failed ({status}) {self._where()}: {_error_desc(info)}.",
                    phase=self._phase(), reason=_error_desc(info))
            if status in ("setup", "active"):
                self._check_moving(info)
                await self._watch_throttle(info)
                self._report(status, info, elapsed)
                decision = self.conv.observe(_sample(info, elapsed))
                if decision is not None:
                    await self._apply(decision)
            elif status == "pre-switchover" and self.switched_at is None:
                await self._switchover()
                continue
            elif status == "postcopy-paused":
                raise MigrationError(
                    f"{self._what()} broke during post-copy: the guest is paused on both sides and "
                    "only a post-copy recovery can save it.", phase="postcopy",
                    reason="post-copy paused: the migration stream broke")
            elif status in _POSTCOPY:
                self.postcopy = True
                self._report(status, info, elapsed)
            elif status not in _UNDER_WAY:
                raise MigrationError(f"{self._what()} is in an unexpected state {status!r}.",
                                     phase=self._phase(), reason=f"unexpected status {status}")
            if self.switched_at is not None and not self.postcopy \
                    and time.monotonic() - self.switched_at > self.settings.switchover_timeout_s:
                raise MigrationError(
                    f"{self._what()} did not finish within {self.settings.switchover_timeout_s:g} s "
                    "after the switchover began.", phase="switchover", reason="stop-and-copy took too long")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_s):
                    self._seen(await events.get())  # a MIGRATION event: look again at once

    def _check_moving(self, info: Mapping[str, Any]) -> None:
        """Raise when the stream has sent nothing for ``stuck_s`` (network cut, peer hung)."""
        sent = int((info.get("ram") or {}).get("transferred") or 0)
        now = time.monotonic()
        if sent != self._moved[0]:
            self._moved = (sent, now)
        elif now - self._moved[1] > self.settings.stuck_s:
            why = f"nothing was sent for {self.settings.stuck_s:g} s: the migration stream is stuck"
            raise MigrationError(f"{self._what()} was given up {self._where()}: {why} (is the network "
                                 "between the nodes down, or the destination gone?).",
                                 phase="transfer", reason=why)

    def _drain(self, events: EventSubscription) -> None:
        while (ev := events.get_nowait()) is not None:
            self._seen(ev)

    def _seen(self, ev: QmpEvent) -> None:
        if ev.name == "STOP" and self.stopped_at is None:
            self.stopped_at = ev.received_at

    def _where(self) -> str:
        return "after the switchover began" if self.switched_at is not None else "while copying memory"

    def _phase(self) -> str:
        if self.postcopy:
            return "postcopy"
        return "switchover" if self.switched_at is not None else "transfer"

    def _report(self, status: str, info: Mapping[str, Any], elapsed: float) -> None:
        if self.on_progress is None:
            return
        s = _sample(info, elapsed)
        ram = info.get("ram") or {}
        self.on_progress(Progress(
            status=status, elapsed_s=elapsed, ram_total_bytes=int(ram.get("total") or 0),
            transferred_bytes=int(ram.get("transferred") or 0), remaining_bytes=s.remaining_bytes,
            iteration=s.iteration, dirty_rate_bytes_s=s.dirty_rate_bytes_s,
            throughput_bytes_s=s.throughput_bytes_s,
            cpu_throttle_pct=int(info.get("cpu-throttle-percentage") or 0),
            downtime_limit_ms=self.downtime_limit_ms, steps=tuple(self.steps)))

    async def _apply(self, decision: Decision) -> None:
        step = decision.step
        log.warning("VM %s: migration: %s", self.src.name, decision.reason)
        self.steps.append(decision.reason)
        if step.action is Action.ABORT:
            raise MigrationAborted(f"{self._what()} was given up: {decision.reason}.",
                                   phase="transfer", reason=decision.reason)
        try:
            if step.action is Action.DOWNTIME:
                await self.src.execute("migrate-set-parameters", {"downtime-limit": step.downtime_ms})
                self.downtime_limit_ms = step.downtime_ms
            elif step.action is Action.AUTO_CONVERGE:
                await self._wake_throttle(step.initial_pct, step.increment_pct)
            elif step.action is Action.POSTCOPY:
                await self.src.execute("migrate-start-postcopy")
                self.postcopy_requested = True
        except QemuExited:
            raise
        except QemuError as err:
            raise MigrationError(f"{self._what()}: QEMU refused the ladder step "
                                 f"{step.describe()}: {err}", phase="transfer", reason=str(err)) from err

    async def _wake_throttle(self, initial_pct: int, increment_pct: int) -> None:
        """Lift the dormant throttle's 1% cap. If QEMU already throttles (by 1%), its next
        bump adds the increment instead of starting at the initial value, so the first
        increment is stretched to land on ``initial_pct`` and put back after that bump."""
        first_increment = increment_pct
        if self.throttle_pct > 0:
            first_increment = max(1, initial_pct - self.throttle_pct)
            self._throttle_fixup = (initial_pct, increment_pct)
        await self.src.execute("migrate-set-parameters", {
            "cpu-throttle-initial": initial_pct, "cpu-throttle-increment": first_increment,
            "max-cpu-throttle": 99})

    async def _watch_throttle(self, info: Mapping[str, Any]) -> None:
        self.throttle_pct = int(info.get("cpu-throttle-percentage") or 0)
        if self._throttle_fixup is not None and self.throttle_pct >= self._throttle_fixup[0]:
            increment = self._throttle_fixup[1]
            self._throttle_fixup = None
            await self.src.execute("migrate-set-parameters", {"cpu-throttle-increment": increment})

    async def _switchover(self) -> None:
        """The guest is stopped and flushed; the hook may still say no."""
        self.switched_at = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.switchover_timeout_s):
                await self.on_switchover()
        except asyncio.CancelledError:
            raise
        except TimeoutError as err:
            raise MigrationError(
                f"{self._what()} was called off: the switchover hook did not answer within "
                f"{self.settings.switchover_timeout_s:g} s.", phase="switchover",
                reason="the switchover hook timed out") from err
        except Exception as err:
            raise MigrationError(f"{self._what()} was called off at the switchover: {err}",
                                 phase="switchover", reason=str(err)) from err
        finally:
            self.hook_ms = (time.monotonic() - self.switched_at) * 1000
        # past this command a post-copy switchover splits the guest's memory between the
        # two QEMUs: it can no longer be cancelled (a pre-copy one still can)
        self.postcopy = self.postcopy_requested
        await self.src.execute("migrate-continue", {"state": "pre-switchover"})

    async def _roll_back(self, err: BaseException) -> None:
        """Stop the migration if QEMU still runs it and make sure the guest runs here.
        Never raises: the original error is what the caller must see."""
        if not self.src.running:
            return
        try:
            with self.src.subscribe("MIGRATION") as events:
                info = await self.src.execute("query-migrate")
                status = str(info.get("status", "none"))
                if status in _POSTCOPY:
                    return
                if status in _UNDER_WAY:
                    if status != "cancelling":
                        await self.src.execute("migrate_cancel")
                    info = await _wait_status(self.src, 0.05, lambda s: s not in _UNDER_WAY, events,
                                              self.settings.cancel_timeout_s)
            if self.was_running:
                sent = await resume_source(self.src, why=f"the migration ended ({info.get('status')})")
                log.info("VM %s: migration rolled back (%s); %s", self.src.name, err,
                         "shoal sent cont" if sent else "QEMU resumed the guest itself")
        except (QemuError, TimeoutError) as rb_err:
            log.error("VM %s: could not roll the migration back after %s: %s", self.src.name, err, rb_err)

    def _stats(self, info: Mapping[str, Any]) -> MigrationStats:
        ram = info.get("ram") or {}
        return MigrationStats(
            total_time_ms=int(info.get("total-time") or 0),
            downtime_ms=int(info.get("downtime") or 0),
            setup_time_ms=int(info.get("setup-time") or 0),
            transferred_bytes=int(ram.get("transferred") or 0),
            iterations=int(ram.get("dirty-sync-count") or 0),
            mbps=float(ram.get("mbps") or 0),
            started_at=self.started_at,
            stopped_at=self.stopped_at,
            completed_at=time.monotonic(),
            postcopy=self.postcopy,
            steps=tuple(self.steps),
            switchover_hook_ms=self.hook_ms,
        )


# ---- quick migration -------------------------------------------------------------------------


def save_command(path: str) -> str:
    """An ``exec:`` command that writes the stream to a local file and syncs it."""
    return f"dd of={shlex.quote(path)} bs=1M conv=fsync status=none"


def load_command(path: str) -> str:
    """An ``exec:`` command that reads the stream back from a local file."""
    return f"cat {shlex.quote(path)}"


async def save_state(src: Qemu, exec_cmd: str, *, timeout_s: float = 600.0) -> MigrationStats:
    """Stop the guest and save its whole state through ``exec:exec_cmd`` (the command gets
    the stream on stdin). On success the source stays stopped (postmigrate): the caller
    quits it, or ``cont``s it to take the VM back. On failure the guest runs again."""
    what = f"saving VM {src.name} through {exec_cmd!r}"
    try:
        status = await src.status()
        was_running = status == "running"
        await _set_capabilities(src, {"events": True, "pause-before-switchover": False,
                                      "auto-converge": False, "postcopy-ram": False})
        await src.execute("migrate-set-parameters", {"max-bandwidth": QUICK_MAX_BANDWIDTH})
    except QemuError as err:
        raise MigrationError(f"{what} could not start: {err}", phase="save", reason=str(err)) from err
    with src.subscribe(("MIGRATION", "STOP")) as events:
        started = time.monotonic()
        stopped_at: float | None = None
        try:
            if was_running:
                mark = src.event_mark()
                await src.stop()
                stopped_at = (await src.wait_event("STOP", since=mark, timeout_s=10)).received_at
            await src.execute("migrate", {"uri": f"exec:{exec_cmd}"})
            info = await _wait_status(src, _PROGRESS_WAIT_S, lambda s: s not in _UNDER_WAY, events, timeout_s)
            if info.get("status") != "completed":
                raise MigrationError(f"{what} failed: {_error_desc(info)}.", phase="save",
                                     reason=_error_desc(info))
            info = await _final_figures(src, info)
        except BaseException as err:
            await asyncio.shield(_undo_save(src, was_running, err))
            if isinstance(err, QemuError | TimeoutError):
                raise MigrationError(f"{what} failed: {err}", phase="save", reason=str(err)) from err
            raise
    ram = info.get("ram") or {}
    return MigrationStats(
        total_time_ms=int(info.get("total-time") or 0), downtime_ms=int(info.get("downtime") or 0),
        setup_time_ms=int(info.get("setup-time") or 0), transferred_bytes=int(ram.get("transferred") or 0),
        iterations=int(ram.get("dirty-sync-count") or 0), mbps=float(ram.get("mbps") or 0),
        started_at=started, stopped_at=stopped_at, completed_at=time.monotonic())


async def _undo_save(src: Qemu, was_running: bool, err: BaseException) -> None:
    if not src.running:
        return
    try:
        with src.subscribe("MIGRATION") as events:
            info = await src.execute("query-migrate")
            if info.get("status") in _UNDER_WAY:
                await src.execute("migrate_cancel")
                await _wait_status(src, 0.05, lambda s: s not in _UNDER_WAY, events, 10)
        if was_running:
            await resume_source(src, why=f"a failed save ({err})")
    except (QemuError, TimeoutError) as undo_err:
        log.error("VM %s: could not resume the guest after a failed save: %s", src.name, undo_err)


async def load_state(
    dst: Qemu,
    exec_cmd: str,
    settings: MigrationSettings | None = None,
    *,
    first_data_timeout_s: float = 10.0,
) -> Mapping[str, Any]:
    """Load a saved state into ``dst`` (started with ``incoming=True, start_paused=True``)
    from ``exec:exec_cmd`` (the command writes the stream on stdout). ``dst`` stays
    paused: ``cont`` it to run the VM. Bound the whole load with ``asyncio.timeout``.

    QEMU 7.2 waits forever when the command exits without writing a byte (a missing
    state file): it never leaves ``setup``. So a load that has not started within
    ``first_data_timeout_s`` fails; the caller then kills ``dst``."""
    what = f"VM {dst.name} could not be restored through {exec_cmd!r}"
    try:
        await prepare_incoming(dst, f"exec:{exec_cmd}", settings or MigrationSettings())
        with dst.subscribe("MIGRATION") as events:
            try:
                await _wait_status(dst, _PROGRESS_WAIT_S, lambda s: s not in ("none", "setup"), events,
                                   first_data_timeout_s)
            except TimeoutError:
                tail = dst.stderr_tail()
                raise MigrationError(
                    f"{what}: the command wrote nothing within {first_data_timeout_s:g} s (is the saved "
                    "state there?)" + (f"; QEMU's log says: {tail}" if tail else "."),
                    phase="load", reason="the state stream never started") from None
            except QemuError as err:
                raise MigrationError(f"{what}: {err}", phase="load", reason=str(err)) from err
        return await wait_incoming(dst)
    except MigrationError as err:
        if err.phase == "load":
            raise
        raise MigrationError(f"{what}: {err.reason}", phase="load", reason=err.reason) from err
