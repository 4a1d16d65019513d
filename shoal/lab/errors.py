"""Errors of the lab. ``str(err)`` is for the user.

    LabError                     (shoal.errors.ShoalError)
     ├── LabNotFound             no lab in the given directory
     ├── LabExists               a lab is already up in that directory
     └── LabToolError            iproute2 (ip, tc) missing or failing
"""

from __future__ import annotations

from shoal.errors import ShoalError


class LabError(ShoalError):
    """Root of the lab package's errors."""


class LabNotFound(LabError):
    pass


class LabExists(LabError):
    pass


class LabToolError(LabError):
    pass
