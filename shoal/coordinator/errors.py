"""Errors of the coordinator package.

    CoordinatorError                (shoal.errors.ShoalError)
     ├── NotCoordinator             a metadata write was attempted by a non-coordinator
     └── LeaseLost                  the coordinator lost its lease and stopped writing
"""

from __future__ import annotations

from shoal.errors import ShoalError


class CoordinatorError(ShoalError):
    """Root of the coordinator package's errors."""


class NotCoordinator(CoordinatorError):
    pass


class LeaseLost(CoordinatorError):
    pass
