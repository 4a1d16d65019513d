"""util.transports: a header and its payload reach the peer whole and in order, on both
event loops, and in one writelines call where the loop sends it with one writev."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import pytest
import uvloop

from shoal.util.transports import write_together


class Recorder(asyncio.WriteTransport):
    """A transport that records how it was written to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", b"".join(bytes(d) for d in list_of_data)))


class AsyncioLike(Recorder):
    """Stands for one of asyncio's own transports (judged by the module of its type)."""


AsyncioLike.__module__ = "asyncio.selector_events"


def test_a_loop_that_keeps_views_gets_one_writelines() -> None:
    t = Recorder()
    write_together(t, (b"head", memoryview(b"payload")))
    assert t.calls == [("writelines", b"headpayload")]


def test_asyncio_before_3_12_gets_separate_writes_so_nothing_is_joined() -> None:
    t = AsyncioLike()
    write_together(t, (b"head", bytearray(b"payload")))
    if sys.version_info < (3, 12):
        assert t.calls == [("write", b"head"), ("write", b"payload")]
    else:
        assert t.calls == [("writelines", b"headpayload")]


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_parts_arrive_whole_and_in_order_over_a_real_socket(loop_name: str) -> None:
    head = b"H" * 40
    payload = bytearray(os.urandom(3 << 20))  # larger than a socket buffer: sent in pieces

    async def main() -> bytes:
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        write_together(transport, (head, memoryview(payload)))
        got = bytearray()
        b.setblocking(False)
        while len(got) < len(head) + len(payload):
            got += await loop.sock_recv(b, 1 << 20)
        transport.close()
        b.close()
        return bytes(got)

    runner = uvloop.run if loop_name == "uvloop" else asyncio.run
    assert runner(main()) == head + payload
