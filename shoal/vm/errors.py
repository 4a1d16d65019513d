"""Errors of the VM layer.

    shoal.errors.ShoalError
     └── VMError                 root of this package
          ├── SpecError           a machine spec cannot become a QEMU command line
          ├── QemuError           QEMU could not start, died, or refused a QMP command
          │    ├── QemuExited        QEMU is gone; ``returncode`` and ``stderr_tail`` say how
          │    └── QemuCommandError  QEMU answered a QMP command with an error
          ├── GuestError          a test guest is missing or its check failed to run
          ├── MigrationConfigError  the migration settings or convergence ladder are wrong
          └── MigrationError      a migration failed; ``phase`` says where, ``reason`` why
               └── MigrationAborted   the convergence policy gave up (the VM kept running)
"""

from __future__ import annotations

from shoal.errors import ShoalError


class VMError(ShoalError):
    """Root of every error this package raises on purpose."""


class QemuError(VMError):
    """QEMU failed to start, exited, or refused a command."""


class GuestError(VMError):
    """A test guest is not built, or its memory/disk check could not be run."""


class MigrationError(VMError):
    """A migration failed. ``phase`` is where (preflight, prepare, transfer, switchover,
    commit); the VM keeps running on the source unless ``phase == "commit"`` says otherwise."""

    def __init__(self, message: str, *, phase: str = "transfer", reason: str = "") -> None:
        super().__init__(message)
        self.phase = phase
        self.reason = reason or message


class MigrationAborted(MigrationError):
    """The convergence policy aborted the migration; the VM keeps running on the source."""


class SpecError(VMError):
    """A :class:`~shoal.vm.qemu.MachineSpec` cannot be turned into a QEMU command line."""


class QemuExited(QemuError):
    """QEMU is not running (any more). ``returncode`` is its exit status (None: never
    started), ``stderr_tail`` the last lines it wrote to its log."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class QemuCommandError(QemuError):
    """QEMU refused a QMP command: ``command`` is what we sent, ``error_class`` and
    ``desc`` are QEMU's answer (e.g. ``GenericError``, "There's a migration process in
    progress")."""

    def __init__(self, message: str, *, command: str, error_class: str, desc: str) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MigrationConfigError(VMError):
    """The migration settings or the convergence ladder (from the config) are invalid;
    ``str()`` says which entry and what is wrong with it."""
