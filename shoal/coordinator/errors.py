"""Errors of the coordinator package.

    CoordinatorError                (shoal.errors.ShoalError)
     ├── NotCoordinator             a metadata write was attempted by a non-coordinator
     ├── LeaseLost                  the coordinator lost its lease and stopped writing
     ├── InvalidRequest             a metadata request is malformed (unknown op, bad argument)
     ├── RevokeFailed               a holder did not acknowledge a map revocation in time;
     │                              nothing was freed (``nodes``)
     ├── MapUnavailable             a node has no valid map of a file (revoked or never
     │                              fetched): refresh it, then retry the I/O
     └── MetadataError              the coordinator refused a request (``code``: the wire
                                    code, e.g. ``not-found``; ``str()`` is its sentence)
"""

from __future__ import annotations

from shoal.errors import ShoalError


class CoordinatorError(ShoalError):
    """Root of the coordinator package's errors."""


class NotCoordinator(CoordinatorError):
    pass


class LeaseLost(CoordinatorError):
    pass


class InvalidRequest(CoordinatorError):
    pass


class RevokeFailed(CoordinatorError):
    def __init__(self, message: str, *, nodes: list[str]):
        super().__init__(message)
        self.nodes = nodes


class MapUnavailable(CoordinatorError):
    def __init__(self, message: str, *, ino: int):
        super().__init__(message)
        self.ino = ino


class MetadataError(CoordinatorError):
    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code
