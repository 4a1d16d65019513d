"""Metadata requests and results on the wire: pure encoding, no I/O.

A request is an op name and a JSON object of arguments (the channel's ``{"op","args"}``);
the node is not an argument, the channel knows who is asking. A result is a JSON object;
a refusal is ``{"error": code, "message": sentence}`` where ``code`` is stable (clients
and the API match on it, never on the sentence).

A file's map, as ``open`` and ``allocate`` return it::

    {"ino": 12, "size": 8388608, "unit_size": 1048576, "map_version": 4294967299,
     "extents": [[file_off, lun_off, length], ...]}     # increasing file_off, bytes

``map_version`` is ``epoch << 32 | counter``: it only grows on one coordinator, and a new
coordinator (higher epoch) starts above every version the old one handed out, so a
node's "never go back to an older map" rule survives failover.

``ERROR_CODES`` is the one table from exceptions to codes; the first matching class
wins, so subclasses come before their bases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.coordinator.errors import (
    InvalidRequest,
    LeaseLost,
    MetadataError,
    NotCoordinator,
    RevokeFailed,
)
from shoal.volume.errors import (
    AlreadyExists,
    DeviceError,
    DirectoryNotEmpty,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotFound,
    VolumeError,
    VolumeFull,
    VolumeInUse,
)

ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (NotFound, "not-found"),
    (AlreadyExists, "exists"),
    (NotADirectory, "not-a-directory"),
    (IsADirectory, "is-a-directory"),
    (DirectoryNotEmpty, "not-empty"),
    (InvalidName, "invalid-name"),
    (VolumeFull, "full"),
    (VolumeInUse, "in-use"),
    (RevokeFailed, "in-use"),
    (NotCoordinator, "not-coordinator"),
    (LeaseLost, "not-coordinator"),
    (InvalidRequest, "invalid-argument"),
    (DeviceError, "io-error"),
    (VolumeError, "io-error"),
)

Extents = list[tuple[int, int, int]]


def error_code(err: BaseException) -> str | None:
    """The wire code of an error we refuse requests with, or None (a bug: let it raise)."""
    for cls, code in ERROR_CODES:
        if isinstance(err, cls):
            return code
    return None


def encode_error(err: BaseException) -> dict[str, Any]:
    code = error_code(err)
    if code is None:
        raise ValueError(f"{type(err).__name__} has no wire error code") from err
    return {"error": code, "message": str(err)}


def check_result(result: Any) -> dict[str, Any]:
    """A result object, or raise the refusal it carries as :class:`MetadataError`."""
    if not isinstance(result, dict):
        raise MetadataError(f"the coordinator answered {type(result).__name__}, not an object",
                            code="io-error")
    if "error" in result:
        raise MetadataError(str(result.get("message") or result["error"]), code=str(result["error"]))
    return result


def encode_map(ino: int, size: int, unit_size: int, version: int,
               extents: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
    return {"ino": ino, "size": size, "unit_size": unit_size, "map_version": version,
            "extents": [[f, lun, n] for f, lun, n in extents]}


def decode_extents(raw: Any) -> Extents:
    """``[[file_off, lun_off, length], ...]`` -> sorted, non-overlapping tuples, or raise."""
    out: Extents = []
    for item in raw or []:
        if not (isinstance(item, list | tuple) and len(item) == 3 and all(isinstance(x, int) for x in item)):
            raise InvalidRequest(f"bad extent {item!r}: expected [file_off, lun_off, length]")
        f, lun, n = item
        if f < 0 or lun < 0 or n <= 0 or (out and f < out[-1][0] + out[-1][2]):
            raise InvalidRequest(f"bad extent {item!r}: negative, empty or overlapping")
        out.append((f, lun, n))
    return out


def int_arg(args: dict[str, Any], name: str, *, minimum: int = 0) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"argument {name!r} must be an integer >= {minimum}, not {value!r}")
    return value


def str_arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"argument {name!r} must be a string, not {value!r}")
    return value
