"""Pipes of ``util.pipes.POOL`` in tests: fill one, empty one, record the ones handed
out and check that none leaked (each is back in the pool empty, or closed)."""

from __future__ import annotations

import os

import pytest

from shoal.util.pipes import POOL, Piped, unread

#: a pipe handed out: (read fd, write fd, inode)
Taken = tuple[int, int, int]


def in_pipe(data: bytes) -> Piped:
    """``data`` in a pipe of the pool, as a spliced block waits."""
    fds = POOL.take()
    assert fds is not None, "this machine gives no pipe of a MiB"
    view, pos = memoryview(data), 0
    while pos < len(data):
        pos += os.write(fds[1], view[pos:])
    return Piped(POOL, fds, len(data))


def take_out(result: Piped | bytes | bytearray) -> bytes:
    """The bytes of a payload; a pipe is emptied and released (emptied)."""
    if not isinstance(result, Piped):
        return bytes(result)
    out = bytearray()
    while len(out) < len(result):
        out += os.read(result.r, len(result) - len(out))
    assert unread(result.r) == 0, "the pipe held more than its payload"
    result.release(emptied=True)
    return bytes(out)


def pool_is_clean() -> bool:
    """Every pipe kept in the pool is empty."""
    return all(unread(r) == 0 for r, _ in POOL._free)


def record_pipes(monkeypatch: pytest.MonkeyPatch) -> list[Taken]:
    """Every pipe the pool hands out from now on (for a fixture)."""
    taken: list[Taken] = []
    take = POOL.take

    def recording() -> tuple[int, int] | None:
        fds = take()
        if fds is not None:
            taken.append((*fds, os.fstat(fds[0]).st_ino))
        return fds

    monkeypatch.setattr(POOL, "take", recording)
    return taken


def closed(pipe: Taken) -> bool:
    """The pipe is closed (its descriptors are gone, or are another file's now)."""
    try:
        return os.fstat(pipe[0]).st_ino != pipe[2]
    except OSError:
        return True


def assert_no_pipe_leaked(taken: list[Taken]) -> None:
    """Each pipe handed out is back in the pool, empty, or closed."""
    assert pool_is_clean(), "a pipe went back to the pool with bytes in it"
    for r, w, ino in taken:
        assert (r, w) in POOL._free or closed((r, w, ino)), f"pipe {r},{w} was neither given back nor closed"
