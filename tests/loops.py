"""Running a test's coroutine on each event loop the agents can run on: asyncio's own
and uvloop (``SHOAL_EVENT_LOOP``), bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"), pytest.param(uvloop.new_event_loop, id="uvloop")]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def run(loop_factory: LoopFactory, main: Coroutine[Any, Any, None], timeout_s: float = 30) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await main

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(bounded())
