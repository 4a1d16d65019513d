"""Where a block request goes: straight to the LUN, or through the coordinator.

:class:`BlockRouter` takes block requests at LUN offsets (the file backend has already
translated file offsets with the file's map) and sends each one *direct* on this node's
storage path when that is allowed, else *redirected* to the coordinator.

Direct is allowed while the path is up, this node's own liveness renewals are current
(the 4T rule: a node that cannot prove it is alive stops touching the LUN) and no
redirect reason is set. When a direct request fails, the path aborts everything queued
on it (:mod:`shoal.datapath.lun`), the router tells its owner (who switches the volume
to ``redirected`` and starts probing) and re-sends the request through the coordinator.
The coordinator preempts this node's old registration at the target before it performs
any of its requests, so a direct write still travelling on the failed path can never
land after the same block was rewritten through the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

from shoal.datapath.errors import PathFailed
from shoal.datapath.lun import FAILURES, StoragePath
from shoal.datapath.states import Counters
from shoal.nbd.backend import ReadDone

log = logging.getLogger(__name__)

#: (kind, offset, length, payload) -> reply payload; kind is read|write|zero|flush
Redirect = Callable[[str, int, int, bytes], Awaitable[bytes]]
#: (offset, length, done) -> started
StartRead = Callable[[int, int, ReadDone], bool]


class BlockRouter:
    def __init__(self, path: StoragePath, *, redirect: Redirect, direct_allowed: Callable[[], bool],
                 on_path_failed: Callable[[str], None], counters: Counters, control: bool = False,
                 start_redirected_read: StartRead | None = None):
        """``control``: use the path's control connection, not the data connections (the
        liveness slot's writes must never queue behind bulk data).
        ``start_redirected_read(offset, length, done)``: a redirected read sent from a
        callback (False: it cannot go now); its failure is RedirectAgain."""
        self.path = path
        self._start_redirected_read = start_redirected_read
        self.control = control
        self._redirect = redirect
        self._direct_allowed = direct_allowed
        self._on_path_failed = on_path_failed
        self.counters = counters

    def direct(self) -> bool:
        return self.path.up and self._direct_allowed()

    async def _route(self, kind: str, offset: int, length: int, payload: bytes = b"") -> bytes:
        if self.direct():
            try:
                c = self.control
                data = b""
                if kind == "read":
                    data = await self.path.read(offset, length, control=c, copy=False)
                elif kind == "write":
                    await self.path.write(offset, payload, control=c)
                elif kind == "zero":
                    await self.path.write_zeroes(offset, length, control=c)
                else:
                    await self.path.flush(control=c)
                self.counters.direct_requests += 1
                self.counters.direct_bytes += length
                return data
            except PathFailed as err:
                self._on_path_failed(str(err))
        data = await self._redirect(kind, offset, length, payload)
        self.counters.redirected_requests += 1
        self.counters.redirected_bytes += length
        return data

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        """A read sent now, from a callback (no task; the common read's fast path):
        direct, or, when the node is redirected, through the coordinator.

        ``done(data, None)`` when it is back; ``done(None, err)`` when it failed. A path
        failure has then been handled as :meth:`read` handles it (path down, owner told)
        and ``err`` is the PathFailed; a redirected read that went wrong ends with
        RedirectAgain: either way the caller reads again with :meth:`read`, which
        redirects, waits or retries as needed. Returns False, having sent nothing, when
        the read cannot leave at once."""
        if self.control:
            return False
        counters = self.counters
        if not self.direct():
            start = self._start_redirected_read
            if start is None:
                return False

            def redirected(data: bytes | None, err: BaseException | None) -> None:
                if err is None:
                    counters.redirected_requests += 1
                    counters.redirected_bytes += length
                done(data, err)

            return start(offset, length, redirected)

        def landed(data: object, err: BaseException | None) -> None:
            if err is None:
                counters.direct_requests += 1
                counters.direct_bytes += length
                done(cast(bytes, data), None)
            elif isinstance(err, FAILURES):
                failure = self.path.failed("read", err)
                self._on_path_failed(str(failure))
                done(None, failure)
            else:
                done(None, err)

        return self.path.start_read(offset, length, landed)

    async def read(self, offset: int, length: int) -> bytes:
        """The data (a bytearray when it came straight from the path: not copied)."""
        return await self._route("read", offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._route("write", offset, len(data), bytes(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._route("zero", offset, length)

    async def flush(self) -> None:
        await self._route("flush", 0, 0)

    async def write_durable(self, offset: int, data: bytes) -> None:
        """A write then a flush (either may be redirected; the coordinator has no FUA
        request for a node)."""
        await self.write(offset, data)
        await self.flush()
