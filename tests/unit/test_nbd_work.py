"""Pieces of the server's work path that need no sockets: buffer reuse, extent
clipping, and what "started" means for a task."""

from __future__ import annotations

import asyncio

from shoal.nbd.requests import Request
from shoal.nbd.server_work import BufferPool, Work, clip_extents

KiB = 1 << 10


def test_buffer_pool_reuses_by_size_class_and_caps_what_it_keeps() -> None:
    pool = BufferPool(max_bytes=3 * 128 * KiB)
    a = pool.take(100 * KiB)
    assert len(a) == 128 * KiB
    assert len(pool.take(1)) == 64 * KiB  # the smallest class
    assert len(pool.take((1 << 20) + 28)) == 2 << 20
    pool.give(a)
    assert pool.take(65 * KiB) is a  # same class: the same buffer again
    given = [bytearray(128 * KiB) for _ in range(4)]
    for buf in given:
        pool.give(buf)
    taken = [pool.take(128 * KiB) for _ in range(4)]
    # three were kept (the cap); the fourth take allocates afresh
    assert sum(any(t is g for g in given) for t in taken) == 3


def test_clip_extents_merges_and_never_exceeds_the_request() -> None:
    assert clip_extents([(10, 0), (10, 0), (100, 3)], 50) == [(20, 0), (30, 3)]
    assert clip_extents([], 8) == [(8, 0)]
    assert clip_extents([(0, 3)], 8) == [(8, 0)]


def test_a_task_cancelled_before_its_first_step_never_runs() -> None:
    ran = []

    async def body(work: Work) -> tuple[bytes, ...]:
        work.started = True
        ran.append(True)
        return (b"",)

    async def main() -> None:
        work = Work(Request(0, 1, 1, 0, 1), 1)
        task = asyncio.get_running_loop().create_task(body(work))
        assert work.cancel_unstarted(task)  # not started: discarded
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not ran

        work = Work(Request(0, 1, 2, 0, 1), 1)
        task = asyncio.get_running_loop().create_task(body(work))
        await asyncio.sleep(0)
        assert not work.cancel_unstarted(task)  # started: it must complete
        await task
        assert ran == [True]

    asyncio.run(main())
