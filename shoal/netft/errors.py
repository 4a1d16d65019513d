"""Errors of the cluster networks. ``str(err)`` is for the user.

    NetftError                   (shoal.errors.ShoalError)
     ├── PeerUnreachable         no network to the peer answered
     ├── AuthenticationFailed    the peer (or we) do not hold the cluster secret
     ├── RemoteProtocolError     the peer broke the channel protocol
     ├── LocalProtocolError      we broke it (a bug on our side)
     └── RemoteError             the peer ran the request and it failed
"""

from __future__ import annotations

from shoal.errors import ShoalError


class NetftError(ShoalError):
    """Root of the cluster network package's errors."""


class PeerUnreachable(NetftError):
    pass


class AuthenticationFailed(NetftError):
    pass


class RemoteProtocolError(NetftError):
    pass


class LocalProtocolError(NetftError):
    pass


class RemoteError(NetftError):
    pass
