"""A child process started the fast way and awaited on the event loop.

``asyncio.create_subprocess_exec`` under uvloop forks the whole parent (libuv has no
vfork on Linux): from an agent of a few hundred MiB that is ~10 ms per spawn, against
~0.2 ms for :class:`subprocess.Popen`, which uses vfork. :func:`spawn` starts the
child with Popen and learns of its exit through a pidfd the loop watches, so spawning
costs the same on either loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from typing import Any


class Child:
    """The part of :class:`asyncio.subprocess.Process` shoal uses: pid, returncode,
    wait(), kill(), send_signal()."""

    def __init__(self, popen: subprocess.Popen[bytes]):
        self._popen = popen
        self.pid = popen.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            self._fd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): a thread waits instead
            self._fd = -1
            fut = loop.run_in_executor(None, popen.wait)
            fut.add_done_callback(lambda f: self._settle())
        else:
            loop.add_reader(self._fd, self._on_exit)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._popen.wait()  # the pidfd is readable: it has exited, this reaps at once
        self._settle()

    def _settle(self) -> None:
        if not self._exited.done():
            self._exited.set_result(int(self._popen.returncode or 0))

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def spawn(argv: list[str], **popen_args: Any) -> Child:
    """Start ``argv`` (``subprocess.Popen`` arguments as keywords); OSError if it cannot run."""
    return Child(subprocess.Popen(argv, **popen_args))
