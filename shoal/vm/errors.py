"""Errors of the VM layer.

    shoal.errors.ShoalError
     └── VMError                 root of this package
          ├── QemuError           QEMU could not start, died, or refused a QMP command
          ├── GuestError          a test guest is missing or its check failed to run
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
