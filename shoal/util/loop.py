"""One way to run a long-lived asyncio program: on uvloop when it is installed.

uvloop's transports and its C event loop cut the per-request cost of the NBD data
path and the cluster channel (both Python) roughly in half. SHOAL_EVENT_LOOP=asyncio
forces the standard loop (for comparison, or when uvloop misbehaves).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """"uvloop" or "asyncio": what :func:`run` will use."""
    if os.environ.get("SHOAL_EVENT_LOOP", "") == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
