"""util.buffers: an unzeroed buffer is an ordinary bytearray of the asked size."""

from __future__ import annotations

from shoal.util.buffers import UNZEROED_MIN, unzeroed


def test_unzeroed_is_a_plain_bytearray_of_the_size_asked() -> None:
    for n in (0, 1, UNZEROED_MIN - 1, UNZEROED_MIN, 1 << 20, (1 << 20) + 7):
        buf = unzeroed(n)
        assert type(buf) is bytearray and len(buf) == n
        buf[:] = b"\x5a" * n  # writable, and owns its memory
        assert buf.count(0x5A) == n
        buf += b"x"  # resizable like any bytearray
        assert len(buf) == n + 1


def test_small_buffers_are_zeroed_as_usual() -> None:
    assert unzeroed(UNZEROED_MIN - 1) == bytes(UNZEROED_MIN - 1)
