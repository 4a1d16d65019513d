"""The QEMU driver: one QEMU process, its command line and its QMP monitor.

What lives here, bottom to top::

    DiskAttach, MachineSpec   what to run: pure data, checked when made
    build_argv()              spec -> argv, pure (the unit tests read it)
    QmpEvent, EventSubscription
    Qemu                      the process, its QMP session and its events
    find_vm_processes()       QEMUs started by shoal on this host, by VM name

Every VM is one ``qemu-system-x86_64`` process started with ``-nodefaults
-no-user-config``: nothing is on the machine that the spec does not name, so the
source and the destination of a migration build the same machine from the same spec.
The machine type is pinned to a versioned one (``pc-i440fx-7.2``) for the same reason.
The process is named ``-name VM,process=shoal-vm-VM``; the kernel keeps only 15
characters of that as the thread name, so processes are found by their command line
(:func:`find_vm_processes`), not by ``comm``.

Process lifetime. Once :meth:`Qemu.start` has spawned QEMU, every way out of it other
than success (QEMU exited, no QMP socket in time, cancellation) kills the process group
and reaps it before the error propagates. After a successful start the owner ends the
process with :meth:`Qemu.quit`, or :meth:`Qemu.kill` + :meth:`Qemu.wait_exit`, or by
leaving ``async with``. QEMU runs in its own session, so a Ctrl-C meant for the agent
does not reach it and ``kill()`` also ends the ``exec:`` helpers QEMU spawned for a
migration; ``die_with_parent=True`` adds ``PR_SET_PDEATHSIG`` (the signal comes when
the *thread* that ran the event loop exits): the agent's VMs die with it. It is set by
``setpriv --pdeathsig`` in front of QEMU's argv, not by a ``preexec_fn``, which would
force a full fork of the (large) agent process: that cost 15-20 ms per start.

Events. QMP events are stamped with ``time.monotonic()`` the moment the QMP reader
hands them over, before any other task runs (``QmpEvent.received_at``), numbered, kept
in a short history (the last 256) and fanned out to subscriptions. To wait for an event
without a race, take ``mark = qemu.event_mark()`` (or open a subscription) *before*
the command that triggers it, then ``await qemu.wait_event(NAME, since=mark, ...)``.
When QEMU exits, subscriptions get every event QEMU sent before it died, then end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from shoal.util.child import Child, spawn
from shoal.vm.errors import QemuCommandError, QemuError, QemuExited, SpecError

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: a versioned machine type: both ends of a migration must build the same board
DEFAULT_MACHINE = "pc-i440fx-7.2"
ACCELS = ("kvm", "tcg")

#: how long start() waits for QEMU to open its QMP socket and greet
START_TIMEOUT_S = 15.0
#: how long quit() waits for QEMU to exit after ``quit`` before it kills it
QUIT_TIMEOUT_S = 5.0
#: how long a dying QEMU's last QMP events may take to be read after it exited
DRAIN_TIMEOUT_S = 1.0
#: how long a SIGKILLed QEMU may take to be reaped
REAP_TIMEOUT_S = 10.0
_CONNECT_RETRY_S = 0.02

EVENT_HISTORY = 256
_STDERR_TAIL_BYTES = 4096
_STDERR_TAIL_LINES = 6
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL
_UNIX_PATH_MAX = 107

_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# QEMU ids: a letter first, then letters, digits, '-', '.', '_'; virtio-blk keeps 20
# bytes of serial, and the node name doubles as the serial the guest sees
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,19}")
_PROCESS_PREFIX = "shoal-vm-"


# ---- what to run -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskAttach:
    """One disk: an NBD export on a local unix socket (the node agent serves it).

    ``node_name`` is the QEMU block node and the virtio serial the guest sees
    (``/dev/disk/by-id/virtio-NODE_NAME``)."""

    socket_path: str
    export: str
    node_name: str

    def __post_init__(self) -> None:
        if not _NODE_NAME.fullmatch(self.node_name):
            raise SpecError(
                f"disk node name {self.node_name!r} is not usable: it must start with a letter, "
                "hold only letters, digits, '-', '.', '_', and be at most 20 characters."
            )
        if not self.socket_path or len(os.fsencode(self.socket_path)) > _UNIX_PATH_MAX:
            raise SpecError(
                f"disk {self.node_name}: the NBD socket path {self.socket_path!r} is empty or "
                f"longer than {_UNIX_PATH_MAX} bytes; use a shorter run directory."
            )


@dataclass(frozen=True)
class MachineSpec:
    """A VM's machine: everything QEMU needs, and nothing host-specific but paths."""

    name: str
    memory_mib: int
    cpus: int = 1
    cpu_model: str = "qemu64"
    machine: str = DEFAULT_MACHINE
    disks: tuple[DiskAttach, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    serial_log: str | None = None
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _VM_NAME.fullmatch(self.name):
            raise SpecError(
                f"VM name {self.name!r} is not usable: use 1-64 letters, digits, '-', '.', '_', "
                "starting with a letter or digit."
            )
        if not isinstance(self.memory_mib, int) or self.memory_mib < 1:
            raise SpecError(f"VM {self.name}: memory_mib must be a positive number of MiB, not {self.memory_mib!r}.")
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= 255:
            raise SpecError(f"VM {self.name}: cpus must be 1-255, not {self.cpus!r}.")
        names = [d.node_name for d in self.disks]
        if len(set(names)) != len(names):
            raise SpecError(f"VM {self.name}: two disks share a node name ({', '.join(names)}).")
        if (self.initrd or self.append) and not self.kernel:
            raise SpecError(f"VM {self.name}: initrd and append need a kernel.")


def _opt(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return value.replace(",", ",,")


def build_argv(
    spec: MachineSpec,
    *,
    accel: str,
    qmp_socket: str,
    incoming: str | None,
    start_paused: bool,
    binary: str = QEMU_BINARY,
) -> list[str]:
    """The QEMU command line for ``spec``. Pure: no file is looked at.

    ``incoming`` is passed to ``-incoming`` (``"defer"`` waits for ``migrate-incoming``);
    ``start_paused`` adds ``-S`` (the CPUs wait for ``cont``)."""
    if accel not in ACCELS:
        raise SpecError(f"accelerator {accel!r} is not one of {', '.join(ACCELS)}.")
    if len(os.fsencode(qmp_socket)) > _UNIX_PATH_MAX:
        raise SpecError(
            f"VM {spec.name}: the QMP socket path {qmp_socket!r} is longer than "
            f"{_UNIX_PATH_MAX} bytes; use a shorter run directory."
        )
    argv = [
        binary,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-name", f"{spec.name},process={_PROCESS_PREFIX}{spec.name}",
        "-msg", "timestamp=on",
        "-machine", spec.machine,
        "-accel", accel,
        "-cpu", spec.cpu_model,
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mib),
        "-chardev", f"socket,id=qmp,path={_opt(qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.serial_log:
        argv += ["-chardev", f"file,id=serial0,path={_opt(spec.serial_log)},append=on",
                 "-serial", "chardev:serial0"]
    for d in spec.disks:
        argv += [
            "-blockdev",
            f"driver=nbd,node-name={d.node_name},server.type=unix,"
            f"server.path={_opt(d.socket_path)},export={_opt(d.export)}",
            "-device", f"virtio-blk-pci,drive={d.node_name},id={d.node_name}-dev,serial={d.node_name}",
        ]
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
    if spec.initrd:
        argv += ["-initrd", spec.initrd]
    if spec.append:
        argv += ["-append", spec.append]
    if incoming:
        argv += ["-incoming", incoming]
    if start_paused:
        argv.append("-S")
    argv += list(spec.extra_args)
    return argv


# ---- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event. ``received_at`` is ``time.monotonic()`` when shoal read it;
    ``qemu_time`` is QEMU's own stamp (wall clock, seconds since the epoch)."""

    seq: int
    name: str
    data: Mapping[str, Any]
    received_at: float
    qemu_time: float


EventPredicate = Callable[[QmpEvent], bool]


class EventSubscription:
    """Events from one QEMU from the moment of subscribing: ``await get()`` or
    ``async for``. Use as a context manager so it is dropped when done. ``get()``
    raises :class:`QemuExited` once QEMU has exited and every earlier event was read;
    ``async for`` just ends then."""

    def __init__(self, owner: Qemu, names: frozenset[str] | None, predicate: EventPredicate | None):
        self._owner = owner
        self._names = names
        self._predicate = predicate
        self._queue: asyncio.Queue[QmpEvent | None] = asyncio.Queue()

    def matches(self, event: QmpEvent) -> bool:
        if self._names is not None and event.name not in self._names:
            return False
        return self._predicate is None or self._predicate(event)

    def _offer(self, event: QmpEvent) -> None:
        if self.matches(event):
            self._queue.put_nowait(event)

    def _end(self) -> None:
        self._queue.put_nowait(None)

    async def get(self) -> QmpEvent:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # every later get() ends the same way
            raise self._owner._exited_error("it sends no more events")
        return item

    def get_nowait(self) -> QmpEvent | None:
        """The next event already received, or None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is None:
            self._queue.put_nowait(None)
        return item

    def close(self) -> None:
        self._owner._unsubscribe(self)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        return self

    async def __anext__(self) -> QmpEvent:
        try:
            return await self.get()
        except QemuExited:
            raise StopAsyncIteration from None


class _Tap(EventListener):
    """Hands each QMP event to the driver synchronously, inside the QMP reader task, so
    the receive time is exact and nothing piles up in a queue nobody reads."""

    def __init__(self, sink: Callable[[Message], None]):
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        self._sink(event)


# ---- the process -------------------------------------------------------------------------


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


class Qemu:
    """One QEMU process for ``spec`` and its QMP session. See the module docstring for
    the lifetime and event rules. Not thread-safe: use it from one event loop."""

    def __init__(
        self,
        spec: MachineSpec,
        *,
        accel: str,
        qmp_socket: str | os.PathLike[str],
        stderr_log: str | os.PathLike[str],
        incoming: str | bool | None = None,
        start_paused: bool = False,
        binary: str = QEMU_BINARY,
        cwd: str | os.PathLike[str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        quit_timeout_s: float = QUIT_TIMEOUT_S,
        die_with_parent: bool = False,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.accel = accel
        self.qmp_socket = os.fspath(qmp_socket)
        self.stderr_log = os.fspath(stderr_log)
        self.incoming = "defer" if incoming is True else (incoming or None)
        self.argv = build_argv(spec, accel=accel, qmp_socket=self.qmp_socket, incoming=self.incoming,
                               start_paused=start_paused, binary=binary)
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.start_timeout_s = start_timeout_s
        self.quit_timeout_s = quit_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: Child | None = None
        self._exit_task: asyncio.Task[int] | None = None
        self._qmp: QMPClient | None = None
        self._history: deque[QmpEvent] = deque(maxlen=EVENT_HISTORY)
        self._seq = 0
        self._subs: list[EventSubscription] = []
        self._events_ended = False

    def __repr__(self) -> str:
        return f"<Qemu {self.name} pid={self.pid} returncode={self.returncode}>"

    # ---- facts -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited and been reaped, else None."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        """The process exists and has not been reaped (it may be paused)."""
        return self._proc is not None and self._proc.returncode is None

    def stderr_tail(self) -> str:
        """The last lines QEMU wrote to its log, joined into one line."""
        try:
            with open(self.stderr_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _STDERR_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " / ".join(lines[-_STDERR_TAIL_LINES:])

    def _exited_error(self, what: str) -> QemuExited:
        rc = self.returncode
        tail = self.stderr_tail()
        if self._proc is None:
            how = "was never started"
        elif rc is None:
            how = "lost its QMP connection"
        elif rc < 0:
            how = f"was killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        msg = f"QEMU for VM {self.name} {how}: {what}"
        msg += f"; its log says: {tail}" if tail else "."
        return QemuExited(msg, returncode=rc, stderr_tail=tail)

    # ---- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn QEMU and connect to its QMP socket. On any failure (QEMU exits, no QMP in
        ``start_timeout_s``, cancellation) QEMU is killed and reaped before this returns."""
        if self._proc is not None:
            raise QemuError(f"QEMU for VM {self.name} was already started (pid {self.pid}).")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_socket)  # a stale socket would refuse us until QEMU replaced it
        logf = open(self.stderr_log, "ab")  # noqa: SIM115 - the child keeps its own copy
        argv, preexec = list(self.argv), None
        if self.die_with_parent:
            # setpriv (util-linux) sets the death signal and execs QEMU: no Python code runs
            # between fork and exec, so the spawn stays a fast vfork even from a big agent
            setpriv = shutil.which("setpriv")
            if setpriv:
                argv = [setpriv, "--pdeathsig", "KILL", *argv]
            else:
                preexec = _set_pdeathsig
        try:
            # Popen's vfork, not the loop's subprocess support (uvloop forks: ~10 ms)
            self._proc = await spawn(
                argv,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=self.cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as err:
            raise QemuExited(
                f"cannot run {self.argv[0]} for VM {self.name}: {err.strerror or err}; "
                "install the Debian package qemu-system-x86.",
            ) from err
        finally:
            logf.close()
        log.info("VM %s: QEMU started, pid %s: %s", self.name, self._proc.pid, " ".join(self.argv))
        self._exit_task = asyncio.get_running_loop().create_task(
            self._watch_exit(), name=f"qemu-{self.name}-exit")
        try:
            await self._connect()
        except BaseException:
            await self._kill_and_reap()
            raise

    async def _connect(self) -> None:
        assert self._exit_task is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        last: Exception | None = None
        while True:
            if self._exit_task.done():
                await self._exit_task
                raise self._exited_error("it did not start")
            if os.path.exists(self.qmp_socket):
                qmp = QMPClient(f"qmp-{self.name}")
                qmp.register_listener(_Tap(self._on_event))
                try:
                    async with asyncio.timeout(max(0.1, deadline - loop.time())):
                        await qmp.connect(self.qmp_socket)
                except (ConnectError, TimeoutError) as err:
                    last = err
                else:
                    self._qmp = qmp
                    return
            if loop.time() > deadline:
                why = f" (last try: {last})" if last else ""
                tail = self.stderr_tail()
                raise QemuError(
                    f"QEMU for VM {self.name} did not answer on its QMP socket {self.qmp_socket} "
                    f"within {self.start_timeout_s:g} s{why}" + (f"; its log says: {tail}" if tail else ".")
                )
            await asyncio.sleep(_CONNECT_RETRY_S)

    async def _watch_exit(self) -> int:
        assert self._proc is not None
        rc = await self._proc.wait()
        log.info("VM %s: QEMU pid %s exited with %s", self.name, self._proc.pid, rc)
        qmp = self._qmp
        if qmp is not None:
            # QEMU's last events may still be in the socket: let QMP's reader hand them over
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    while qmp.runstate is Runstate.RUNNING:
                        await qmp.runstate_changed()
            await self._disconnect()
        self._end_events()
        return rc

    async def _disconnect(self) -> None:
        qmp = self._qmp
        if qmp is None or qmp.runstate is Runstate.IDLE:
            return
        # disconnect() re-raises whatever ended the session (EOF when QEMU died): expected
        with contextlib.suppress(QMPError, OSError, EOFError):
            await qmp.disconnect()

    # ---- stop -------------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL QEMU and the helpers it spawned (its process group). Reap with wait_exit()."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # QEMU leads its own group (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.kill()

    async def wait_exit(self) -> int:
        """Wait until QEMU has exited and return its status; cancelling the wait leaves
        QEMU alone."""
        if self._exit_task is None:
            raise self._exited_error("there is nothing to wait for")
        return await asyncio.shield(self._exit_task)

    async def _kill_and_reap(self) -> None:
        self.kill()
        if self._exit_task is not None:
            # SIGKILL cannot be ignored, so this is short; if we are cancelled again the
            # watcher task still reaps it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAP_TIMEOUT_S):
                    await asyncio.shield(self._exit_task)

    async def quit(self) -> int | None:
        """Ask QEMU to quit, kill it if it has not exited within ``quit_timeout_s``, and
        return its exit status (None if it was never started). Cancelling kills it."""
        if self._proc is None:
            return None
        try:
            if self.returncode is None and self._qmp is not None and self._qmp.runstate is Runstate.RUNNING:
                # QEMU may hang up before it answers: either way it is on its way out
                with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                    async with asyncio.timeout(self.quit_timeout_s):
                        await self._qmp.execute("quit")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.quit_timeout_s):
                        return await self.wait_exit()
                log.warning("VM %s: QEMU did not quit within %g s; killing it", self.name, self.quit_timeout_s)
        except BaseException:
            self.kill()
            raise
        await self._kill_and_reap()
        return self.returncode

    async def __aenter__(self) -> Qemu:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._kill_and_reap()

    # ---- QMP --------------------------------------------------------------------------------

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its answer.

        Raises QemuCommandError when QEMU refuses it, QemuExited when QEMU is gone."""
        qmp = self._qmp
        if qmp is None or qmp.runstate is not Runstate.RUNNING:
            raise self._exited_error(f"cannot run {cmd}")
        try:
            return await qmp.execute(cmd, dict(args) if args is not None else None)
        except ExecuteError as err:
            raise QemuCommandError(
                f"QEMU for VM {self.name} refused {cmd}: {err}",
                command=cmd, error_class=err.error_class, desc=str(err),
            ) from err
        except (QMPError, OSError, EOFError) as err:
            if self._exit_task is not None:  # learn the exit status for the message
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_TIMEOUT_S):
                        await asyncio.shield(self._exit_task)
            raise self._exited_error(f"it went away during {cmd}") from err

    async def status(self) -> str:
        """QEMU's run state: running, paused, inmigrate, postmigrate, finish-migrate, ..."""
        return str((await self.execute("query-status"))["status"])

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def pmemsave(self, addr: int, size: int, path: str | os.PathLike[str]) -> None:
        """Write ``size`` bytes of guest-physical memory from ``addr`` to ``path`` (as
        QEMU's user, on this host)."""
        await self.execute("pmemsave", {"val": addr, "size": size, "filename": os.fspath(path)})

    # ---- events -----------------------------------------------------------------------------

    def _on_event(self, msg: Message) -> None:
        now = time.monotonic()
        if self._qmp is not None:
            self._qmp.events.clear()  # the library's catch-all queue: nobody reads it
        raw_stamp = msg.get("timestamp")
        stamp: dict[str, Any] = raw_stamp if isinstance(raw_stamp, dict) else {}
        raw_data = msg.get("data")
        self._seq += 1
        event = QmpEvent(
            seq=self._seq,
            name=str(msg.get("event", "")),
            data=dict(raw_data) if isinstance(raw_data, dict) else {},
            received_at=now,
            qemu_time=float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6,
        )
        log.debug("VM %s: event %s %s", self.name, event.name, event.data)
        self._history.append(event)
        for sub in list(self._subs):
            sub._offer(event)

    def _end_events(self) -> None:
        self._events_ended = True
        for sub in self._subs:
            sub._end()

    def event_mark(self) -> int:
        """A marker for "now": events received later have a greater ``seq``."""
        return self._seq

    def events_since(self, mark: int) -> list[QmpEvent]:
        """Events received after ``mark`` that are still in the history."""
        return [e for e in self._history if e.seq > mark]

    def subscribe(
        self, names: str | Iterable[str] | None = None, predicate: EventPredicate | None = None
    ) -> EventSubscription:
        """Events named ``names`` (all when None) passing ``predicate``, from now on."""
        wanted = frozenset([names] if isinstance(names, str) else names) if names is not None else None
        sub = EventSubscription(self, wanted, predicate)
        self._subs.append(sub)
        if self._events_ended:
            sub._end()
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    async def wait_event(
        self,
        name: str,
        predicate: EventPredicate | None = None,
        *,
        timeout_s: float,
        since: int | None = None,
    ) -> QmpEvent:
        """The first ``name`` event passing ``predicate`` received after ``since`` (a
        value of :meth:`event_mark` taken before the triggering command), or after this
        call when ``since`` is None. Raises QemuError when none comes within
        ``timeout_s``, QemuExited when QEMU exits first."""
        with self.subscribe(name, predicate) as sub:
            if since is not None:
                for event in self.events_since(since):
                    if sub.matches(event):
                        return event
            try:
                async with asyncio.timeout(timeout_s):
                    return await sub.get()
            except TimeoutError as err:
                raise QemuError(
                    f"QEMU for VM {self.name} sent no {name} event within {timeout_s:g} s."
                ) from err


# ---- finding processes -------------------------------------------------------------------


def find_vm_processes(name: str | None = None) -> dict[int, str]:
    """QEMU processes shoal started on this host: pid -> VM name (only ``name`` if given).

    Read from ``/proc/*/cmdline`` (the ``-name VM,process=shoal-vm-VM`` argument)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg != b"-name":
                continue
            value = args[i + 1].decode(errors="replace")
            vm, _, rest = value.partition(",")
            if rest == f"process={_PROCESS_PREFIX}{vm}" and (name is None or vm == name):
                found[int(entry.name)] = vm
    return found
