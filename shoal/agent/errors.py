"""Errors of the node agent and its control socket. ``str(err)`` is for the user.

    AgentError                   (shoal.errors.ShoalError)
     ├── AgentNotRunning         no agent answers on the node's control socket
     ├── AgentAlreadyRunning     another agent holds the control socket
     └── ControlError            the agent answered the request with an error
"""

from __future__ import annotations

from shoal.errors import ShoalError


class AgentError(ShoalError):
    """Root of the agent package's errors."""


class AgentNotRunning(AgentError):
    exit_code = 3


class AgentAlreadyRunning(AgentError):
    pass


class ControlError(AgentError):
    pass
