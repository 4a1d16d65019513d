"""Errors of the data path.

    DataPathError                 (shoal.errors.ShoalError)
     ├── PathFailed               this node's storage path failed or timed out (I/O was aborted)
     ├── Fenced                   this node's lease expired and the cluster fenced it: it
     │                            serves no I/O until it has rejoined
     └── NoCoordinator            no coordinator could be reached in time
"""

from __future__ import annotations

from shoal.errors import ShoalError


class DataPathError(ShoalError):
    """Root of the data path's errors."""


class PathFailed(DataPathError):
    pass


class Fenced(DataPathError):
    pass


class NoCoordinator(DataPathError):
    pass


class RedirectAgain(DataPathError):
    """A read sent through the coordinator from a callback got no answer it could use:
    read again the long way (which waits for a coordinator, retries, is fenced)."""
