"""One node's storage path to a volume's LUN: registered NBD connections to the target.

A LUN is named by a URL, ``nbd://HOST:PORT/EXPORT``. The node opens its connections
*registered* with the target as holder ``<node name>`` and a key (NBD fencing, see
docs/NBD.md): the coordinator can then *preempt* every connection of this node whose
key is below a floor, after which nothing sent on them can land on the LUN, even if
their packets arrive late. That is what makes a switch to redirected I/O safe: the
coordinator preempts the node's old key before it performs any of the node's I/O.

Keys: ``generation << 32 | attempt``. ``generation`` is the node's liveness-slot
generation (it grows on every rejoin); ``attempt`` grows every time the node opens the
path again after a failure. A fenced node (floor ``(g + 1) << 32``) can only come back
by rejoining, which gives it generation ``g + 1``.

Every request carries the I/O timeout; a request that fails or times out aborts *all*
connections of the path (what was queued on them is discarded, what was in flight has
an unknown fate) and raises :class:`PathFailed`. The path is then down until
:meth:`StoragePath.reopen` succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import cast

from shoal.config.volumes import parse_lun
from shoal.datapath.errors import PathFailed
from shoal.errors import UsageError
from shoal.nbd.client import ClientSettings, NBDClient, Then
from shoal.nbd.constants import TxFlag
from shoal.nbd.errors import NBDError
from shoal.util.pipes import Piped

log = logging.getLogger(__name__)

DATA_CONNECTIONS = 2
#: what a request on the path can fail with; any of them takes the path down
FAILURES = (NBDError, OSError, TimeoutError)


@dataclass(frozen=True)
class LunAddress:
    host: str
    port: int
    export: str

    @classmethod
    def parse(cls, url: str) -> LunAddress:
        lun = parse_lun(url)  # the config validated it already; this only narrows the kind
        if not lun.is_nbd or lun.host is None:
            raise UsageError(f"LUN {url!r} is a local path; the agent reaches LUNs over NBD "
                             "(nbd://HOST:PORT/EXPORT) — serve it with 'shoal nbd serve --file'")
        return cls(lun.host, lun.port or 10809, lun.export or "")

    def __str__(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.export}"


def make_key(generation: int, attempt: int) -> int:
    return (generation << 32) | (attempt & 0xFFFFFFFF)


class StoragePath:
    """Registered connections to the LUN; async block I/O bounded by the I/O timeout."""

    def __init__(self, address: LunAddress, holder: str, *, io_timeout_s: float):
        self.address = address
        self.holder = holder
        self.io_timeout_s = io_timeout_s
        self.key = 0
        self.size = 0
        self.failure: str | None = "not opened yet"
        self._clients: list[NBDClient] = []
        self._control: NBDClient | None = None
        self._rr = itertools.count()

    @property
    def up(self) -> bool:
        return self.failure is None

    def _settings(self) -> ClientSettings:
        return ClientSettings(connect_timeout_s=max(self.io_timeout_s, 1.0), request_timeout_s=self.io_timeout_s,
                              reconnect_attempts=1, max_in_flight=64)

    async def open(self, key: int) -> None:
        """(Re)open every connection registered with ``key``; raises PathFailed."""
        self.abort("reopening")
        addr = (self.address.host, self.address.port)
        clients: list[NBDClient] = []
        try:
            for _ in range(DATA_CONNECTIONS + 1):
                clients.append(await NBDClient.connect(addr, self.address.export, self._settings(),
                                                       register=(self.holder, key)))
        except (NBDError, OSError, TimeoutError) as err:
            for c in clients:
                c.abort("open failed")
            raise PathFailed(f"cannot open {self.address}: {err}") from err
        self._control, *self._clients = clients
        self.size = clients[0].size
        self.key = key
        self.failure = None
        log.info("%s: storage path to %s open (key %#x)", self.holder, self.address, key)

    def abort(self, reason: str) -> dict[str, int]:
        """Abort every connection: queued requests are discarded, in-flight ones fail."""
        totals = {"discarded": 0, "in_flight": 0}
        clients = [*self._clients, *([self._control] if self._control else [])]
        self._clients, self._control = [], None
        if self.failure is None:
            self.failure = reason
        for c in clients:
            for k, v in c.abort(reason).items():
                totals[k] = totals.get(k, 0) + v
        return totals

    def _pick(self, control: bool) -> NBDClient:
        if self.failure is not None:
            raise PathFailed(self.failure)
        if control:
            assert self._control is not None
            return self._control
        return self._clients[next(self._rr) % len(self._clients)]

    async def _do(self, what: str, control: bool, fn: object) -> object:
        client = self._pick(control)
        try:
            # the client's own request timeout is the I/O timeout (it aborts the connection)
            return await fn(client)  # type: ignore[operator]
        except FAILURES as err:
            raise self.failed(what, err) from err

    def failed(self, what: str, err: BaseException) -> PathFailed:
        """A request on the path failed (one of FAILURES): the path goes down, every
        connection is aborted; returns the PathFailed to raise."""
        detail = str(err) or f"no answer within the I/O timeout ({self.io_timeout_s:g} s)"
        reason = f"{what} failed: {detail}"
        if self.failure is None:
            counts = self.abort(reason)
            log.warning("%s: storage path to %s failed (%s); aborted %d queued and %d in-flight requests",
                        self.holder, self.address, reason, counts["discarded"], counts["in_flight"])
        return PathFailed(reason)

    def start_read(self, offset: int, length: int, then: Then) -> bool:
        """A small data read sent now, without a task (``NBDClient.start_read``):
        ``then`` gets the bytearray the data came in, or the client's error (one of
        FAILURES, which the caller hands to :meth:`failed`). False when the path is
        down or the read cannot leave at once: the caller awaits :meth:`read`."""
        if self.failure is not None:
            return False
        return self._clients[next(self._rr) % len(self._clients)].start_read(offset, length, then)

    async def read(self, offset: int, length: int, *, control: bool = False, copy: bool = True) -> bytes:
        """``copy=False``: the bytearray the data was received into (no copy; the data
        path only sends it on)."""
        data = await self._do("read", control, lambda c: c.read(offset, length) if copy else c.read_buffer(offset, length))
        assert isinstance(data, (bytes, bytearray))
        return cast(bytes, data)  # a bytearray reads like bytes to every caller of the data path

    async def read_piped(self, offset: int, length: int) -> bytes | Piped:
        """Like ``read(copy=False)``, but a large read's data may be left in a pipe,
        for a caller that only splices it on to a socket (``NBDClient.read_piped``)."""
        data = await self._do("read", False, lambda c: c.read_piped(offset, length))
        assert isinstance(data, (bytearray, Piped))
        return cast(bytes, data) if isinstance(data, bytearray) else data

    @property
    def can_fua(self) -> bool:
        """The target takes FUA writes (a write durable before its reply)."""
        return self._control is not None and bool(self._control.flags & TxFlag.SEND_FUA)

    async def write(self, offset: int, data: bytes, *, fua: bool = False, control: bool = False) -> None:
        await self._do("write", control, lambda c: c.write(offset, data, fua=fua))

    async def write_piped(self, offset: int, payload: Piped) -> None:
        """A write whose data waits in a pipe, spliced on to the target
        (``NBDClient.write_piped``)."""
        await self._do("write", False, lambda c: c.write_piped(offset, payload))

    async def write_zeroes(self, offset: int, length: int, *, control: bool = False) -> None:
        await self._do("write zeroes", control, lambda c: c.write_zeroes(offset, length))

    async def flush(self, *, control: bool = False) -> None:
        # one FLUSH covers every connection (the target advertises multi-conn)
        await self._do("flush", control, lambda c: c.flush())

    async def close(self) -> None:
        for c in [*self._clients, *([self._control] if self._control else [])]:
            try:
                async with asyncio.timeout(self.io_timeout_s):
                    await c.close()
            except (NBDError, OSError, TimeoutError):
                c.abort("close")
        self._clients, self._control = [], None
        self.failure = "closed"
