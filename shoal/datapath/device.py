"""The blocking :class:`~shoal.volume.device.Device` interface over async block I/O.

The volume code (journal, checkpoints, leases) is blocking and runs in threads; the
node's storage path is asyncio on the agent's loop. :class:`LunDevice` mirrors
``Device`` (``pread``/``pwrite``/``write_zeroes``/``flush``/``size``) and runs each
call on the loop, waiting from the calling thread. It must never be called from the
loop's own thread (that would wait for itself): the agent runs all volume calls in
executor threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from shoal.errors import ShoalError
from shoal.volume.device import Device
from shoal.volume.errors import DeviceError

T = TypeVar("T")


class BlockIO(Protocol):
    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...
    async def flush(self) -> None: ...
    async def write_durable(self, offset: int, data: bytes) -> None:
        """Durable when it returns: a FUA write where the path offers it, else write + flush."""


class LunDevice(Device):
    """A Device whose I/O is done by ``io`` on ``loop``. Thread-safe. (Subclasses Device
    for its type only: no file descriptor is opened.)"""

    is_block = False
    writable = True

    def __init__(self, io: BlockIO, loop: asyncio.AbstractEventLoop, *, size: int, name: str,
                 timeout_s: float | None = None):
        self.io = io
        self.loop = loop
        self.size = size
        self.path = name
        self.timeout_s = timeout_s
        self.fd = -1
        self._punch_ok = self._zeroout_ok = False

    def _run(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("LunDevice called from an event loop thread; run volume calls in an executor")
        fut = asyncio.run_coroutine_threadsafe(call(), self.loop)
        try:
            return fut.result(self.timeout_s)
        except TimeoutError as err:
            fut.cancel()
            raise DeviceError(f"{what} on {self.path} timed out after {self.timeout_s:g} s") from err
        except DeviceError:
            raise
        except (ShoalError, OSError) as err:
            raise DeviceError(f"{what} on {self.path} failed: {err}") from err

    def pread(self, offset: int, length: int) -> bytes:
        data = self._run(f"read of {length} bytes at {offset}", lambda: self.io.read(offset, length))
        return bytes(data) if isinstance(data, bytearray) else data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data)
        self._run(f"write of {len(payload)} bytes at {offset}", lambda: self.io.write(offset, payload))

    def write_zeroes(self, offset: int, length: int) -> None:
        if length > 0:
            self._run(f"zeroing {length} bytes at {offset}", lambda: self.io.write_zeroes(offset, length))

    def flush(self) -> None:
        self._run("flush", self.io.flush)

    def pwrite_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """One durable write (``io.write_durable``: one FUA round trip where the path has FUA)."""
        payload = bytes(data)
        self._run(f"durable write of {len(payload)} bytes at {offset}", lambda: self.io.write_durable(offset, payload))

    def close(self) -> None:
        pass
