"""The root of shoal's exception tree.

Every package defines one root exception deriving from :class:`ShoalError`, and
draws its own subtree in its module docstring. The CLI catches ``ShoalError`` and
prints ``str(err)``, which must be a sentence saying what is wrong and what to do.

    ShoalError
     ├── shoal.volume.errors.VolumeError
     ├── shoal.nbd.errors.NBDError
     └── UsageError            a command-line argument is wrong
"""


class ShoalError(Exception):
    """Base of every error shoal raises on purpose. ``str()`` is for users."""

    #: process exit status the CLI uses for this error
    exit_code = 1


class UsageError(ShoalError):
    """The user asked for something impossible (bad size, missing file...)."""

    exit_code = 2
