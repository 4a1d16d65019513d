"""Errors of the NBD package.

Split by who is at fault, as h11 does: the peer broke the protocol
(:class:`RemoteProtocolError`), or we were asked to do something the protocol
forbids (:class:`LocalProtocolError`). The asyncio adapters turn a remote
violation into one log line and a hard disconnect of that one connection.

    NBDError(ShoalError)
     ├── ProtocolError              the NBD protocol was broken
     │    ├── RemoteProtocolError   ... by the peer (bad magic, bad length, ...)
     │    └── LocalProtocolError    ... by our own caller (API misuse)
     ├── NBDConnectionError         the connection is gone or could not be made
     │    ├── ConnectionAborted     we aborted it; queued requests were discarded
     │    ├── RequestTimeout        a request took longer than its timeout
     │    └── HandshakeRefused      the server refused the export or an option
     ├── NBDCommandError            the server answered a command with an error
     ├── NBDFenced                  REGISTER refused: the holder's key is below its floor
     ├── FencingUnsupported         the server does not know shoal's fencing options
     ├── ExportNotFound             no export by that name
     └── BackendError               a backend failed an operation (carries errno)

``NBDFenced`` and ``FencingUnsupported`` are not connection errors on purpose:
retrying the same connection cannot cure them, so ``reconnect()`` does not.
"""

from __future__ import annotations

import errno as _errno

from shoal.errors import ShoalError


class NBDError(ShoalError):
    """Root of every error the NBD package raises on purpose."""


class ProtocolError(NBDError):
    """The NBD protocol was broken."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must end."""


class LocalProtocolError(ProtocolError):
    """Our caller asked for something the protocol forbids (a bug on our side)."""


class NBDConnectionError(NBDError):
    """The connection is gone, or could not be established."""


class ConnectionAborted(NBDConnectionError):
    """The connection was aborted on purpose; the request was discarded or its fate is unknown."""


class RequestTimeout(NBDConnectionError):
    """A request did not complete in time; the connection was aborted with it."""


class HandshakeRefused(NBDConnectionError):
    """The server refused the handshake (unknown export, unsupported option...)."""

    def __init__(self, message: str, *, reply_type: int = 0):
        super().__init__(message)
        self.reply_type = reply_type


class NBDCommandError(NBDError):
    """The server failed a command; ``errno`` is the NBD error value."""

    def __init__(self, command: str, error: int, message: str = ""):
        name = _errno.errorcode.get(error, str(error))
        text = f"NBD {command} failed with {name}"
        if message:
            text += f": {message}"
        super().__init__(text)
        self.command = command
        self.errno = error
        self.message = message


class NBDFenced(NBDError):
    """The server refused to register ``holder`` with ``key``: a PREEMPT fenced it.

    The message is the server's own sentence; register again with a newer key.
    """

    def __init__(self, message: str, *, holder: str, key: int):
        super().__init__(message)
        self.holder = holder
        self.key = key


class FencingUnsupported(NBDError):
    """The storage target answered a shoal fencing option with NBD_REP_ERR_UNSUP."""

    def __init__(self, target: str, option: str):
        super().__init__(
            f"the storage target at {target} does not support shoal fencing "
            f"({option} unsupported); use `shoal nbd serve` as the target, "
            "or run without fencing"
        )
        self.target = target
        self.option = option


class ExportNotFound(NBDError):
    """No export has the requested name."""

    def __init__(self, name: str):
        super().__init__(f"there is no NBD export named {name!r}")
        self.name = name


class BackendError(NBDError):
    """A backend could not perform an operation; ``errno`` picks the NBD error."""

    def __init__(self, message: str, errno: int = _errno.EIO):
        super().__init__(message)
        self.errno = errno
