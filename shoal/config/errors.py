"""Errors of the cluster configuration. ``str(err)`` is for the user.

    ConfigError                  (shoal.errors.ShoalError)
     ├── ConfigNotFound          the file does not exist or cannot be read
     └── ConfigInvalid           the file parses but says something impossible;
                                 ``problems`` lists one sentence per problem
"""

from __future__ import annotations

from shoal.errors import ShoalError


class ConfigError(ShoalError):
    """Root of the configuration package's errors."""

    exit_code = 2


class ConfigNotFound(ConfigError):
    pass


class ConfigInvalid(ConfigError):
    """One or more problems; each is a full sentence."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source} has {len(problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in problems
            )
        super().__init__(text)
