"""Writing a header and its payload to an asyncio transport in one system call.

``transport.write(header); transport.write(payload)`` sends the header at once, alone:
a TCP segment of a few dozen bytes, which wakes the peer to read just that, then the
payload in a second send. :func:`write_together` hands both to the transport at once,
and uvloop (and asyncio from Python 3.12) sends them with one ``writev``: one send, one
segment boundary and one wakeup of the peer fewer per message. asyncio's transports
before 3.12 join the parts into one ``bytes`` first (a copy of the payload), so there
each part is written by itself, as before.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

#: asyncio's own ``writelines`` joins the parts before Python 3.12
_ASYNCIO_JOINS = sys.version_info < (3, 12)


def write_together(transport: asyncio.WriteTransport, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write ``parts`` in order, in one system call where the loop can."""
    if _ASYNCIO_JOINS and type(transport).__module__.startswith("asyncio"):
        for part in parts:
            transport.write(part)
    else:
        transport.writelines(parts)
