"""Human sizes: ``64K``, ``1M``, ``1.5G``, ``16T`` (binary units) to bytes and back."""

from __future__ import annotations

import re

from shoal.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``text`` as a byte count; raise :class:`UsageError` naming ``what``."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(
            f"{what} {text!r} is not a size; write a number with an optional unit, like 64K, 1M or 10G"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(n: int) -> str:
    """``1048576`` -> ``1.0 MiB``; exact bytes below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
