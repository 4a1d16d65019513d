"""Buffers that are written whole before anything reads them.

``bytearray(n)`` zeroes its ``n`` bytes. For a 1 MiB block the kernel is about to fill
that costs ~100 µs on the lab's VM (a tenth of a redirected block's CPU), for nothing.
:func:`unzeroed` asks CPython's ``PyByteArray_FromStringAndSize(NULL, n)``, which
leaves the contents as the allocator had them: use it only where every byte is
written before the buffer is read or sent (a receive buffer whose frame is emitted
once complete; an NBD read's buffer, whose parser zeroes what a reply leaves unfilled).
"""

from __future__ import annotations

import ctypes

#: smaller buffers are zeroed as usual (the call costs more than the memset)
UNZEROED_MIN = 64 * 1024

_alloc = ctypes.pythonapi.PyByteArray_FromStringAndSize
_alloc.restype = ctypes.py_object
_alloc.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]


def unzeroed(n: int) -> bytearray:
    """A bytearray of ``n`` bytes with unspecified contents (zeroed below UNZEROED_MIN)."""
    if n < UNZEROED_MIN:
        return bytearray(n)
    buf = _alloc(None, n)
    assert isinstance(buf, bytearray) and len(buf) == n
    return buf
