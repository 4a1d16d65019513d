"""Errors of the shared volume. ``str(err)`` is a sentence for the user.

    VolumeError                      (shoal.errors.ShoalError)
     ├── NotAVolume                  no shoal superblock where one should be
     ├── VolumeCorrupt               a checksum or structure is wrong; names what
     ├── VolumeInUse                 the coordinator lease is held and alive
     ├── VolumeFull                  no free units (or metadata space) left
     ├── DeviceError                 the LUN could not be read or written
     ├── RefuseToFormat              the target already holds data
     └── PathError                   a namespace operation cannot be done
          ├── NotFound
          ├── AlreadyExists
          ├── NotADirectory
          ├── IsADirectory
          ├── DirectoryNotEmpty
          └── InvalidName
"""

from __future__ import annotations

from shoal.errors import ShoalError


class VolumeError(ShoalError):
    """Root of the volume package's errors."""


class NotAVolume(VolumeError):
    exit_code = 2


class VolumeCorrupt(VolumeError):
    """Damage found. ``what`` names the damaged structure (for fsck and logs)."""

    def __init__(self, message: str, *, what: str = "metadata"):
        super().__init__(message)
        self.what = what


class VolumeInUse(VolumeError):
    def __init__(self, message: str, *, cluster: str = "", owner: str = ""):
        super().__init__(message)
        self.cluster = cluster
        self.owner = owner


class VolumeFull(VolumeError):
    pass


class DeviceError(VolumeError):
    pass


class RefuseToFormat(VolumeError):
    pass


class PathError(VolumeError):
    def __init__(self, message: str, *, path: str = ""):
        super().__init__(message)
        self.path = path


class NotFound(PathError):
    pass


class AlreadyExists(PathError):
    pass


class NotADirectory(PathError):
    pass


class IsADirectory(PathError):
    pass


class DirectoryNotEmpty(PathError):
    pass


class InvalidName(PathError):
    pass
