"""Transmission-phase replies: encoding (server) and decoding (client), without I/O.

Simple reply (16 bytes, then the data of a successful READ)::

    magic 0x67446698 (4) | error (4) | cookie (8)

Structured reply chunk (20-byte header, then ``length`` bytes of payload)::

    magic 0x668e33ef (4) | flags (2) | type (2) | cookie (8) | length (4)

The server sends a READ as one OFFSET_DATA chunk flagged DONE (so DF is
always honoured), BLOCK_STATUS as one BLOCK_STATUS chunk flagged DONE, and
errors as one ERROR chunk flagged DONE carrying a message. Without
structured replies every reply is simple.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.nbd import wire
from shoal.nbd.constants import (
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
)
from shoal.nbd.errors import RemoteProtocolError

SIMPLE = wire.SIMPLE_REPLY.size
#: see ReplyParser.header_room
LARGE_READ = 128 * 1024
HEADER_ROOM = 8 * 1024
DATA_HEADER = wire.DATA_CHUNK_HEADER.size
_simple_pack = wire.SIMPLE_REPLY.pack
_simple_pack_into = wire.SIMPLE_REPLY.pack_into
_data_pack_into = wire.DATA_CHUNK_HEADER.pack_into
_OFFSET_DATA = int(Chunk.OFFSET_DATA)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _simple_pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_read_header(
    buf: bytearray | memoryview,
    cookie: int,
    offset: int,
    length: int,
    structured: bool,
    at: int = 0,
) -> int:
    """Write the header of a successful READ reply at ``buf[at:]``; return its size."""
    if structured:
        _data_pack_into(
            buf,
            at,
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            _OFFSET_DATA,
            cookie,
            length + 8,
            offset,
        )
        return DATA_HEADER
    _simple_pack_into(buf, at, SIMPLE_REPLY_MAGIC, 0, cookie)
    return SIMPLE


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    payload = wire.ERROR_PAYLOAD.pack(error, len(msg)) + msg
    return (
        wire.CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Chunk.ERROR, cookie, len(payload)
        )
        + payload
    )


def error_reply(cookie: int, error: int, message: str, structured: bool) -> bytes:
    return error_chunk(cookie, error, message) if structured else simple_reply(cookie, error)


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    payload = bytearray(wire.U32.pack(context_id))
    for length, flags in extents:
        payload += wire.EXTENT.pack(length, flags)
    return (
        wire.CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Chunk.BLOCK_STATUS, cookie, len(payload)
        )
        + payload
    )


# --- client side --------------------------------------------------------------


@dataclass(slots=True)
class ReplyEvent:
    """One simple reply, or one structured chunk (``done`` on the last one).

    For a read, ``data`` holds the bytes and ``offset`` where they go
    (OFFSET_DATA), or ``hole`` the length of zeros at ``offset`` (OFFSET_HOLE).
    """

    cookie: int
    done: bool
    error: int = 0
    message: str = ""
    offset: int = 0
    data: bytes = b""
    hole: int = 0
    filled: int = 0  # bytes already copied into the read's destination
    extents: list[tuple[int, int]] | None = None
    context_id: int = 0


class ReplyParser:
    """Splits the server's byte stream into :class:`ReplyEvent`.

    A simple reply to a READ carries data whose length only the request
    knows, so :meth:`expect_read` must be told about every read in flight.
    Given a destination buffer, read data is copied straight into it (the
    event then has ``data == b""`` and ``filled`` set) instead of being
    sliced out as new bytes objects; once a read's header is parsed,
    :meth:`want_into` offers the rest of its destination, so a caller can have
    the kernel receive the data there without any copy.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        # cookie -> (offset, length, destination or None)
        self._reads: dict[int, tuple[int, int, bytearray | None]] = {}
        # the rest of a read's data whose header has been parsed: where the next bytes
        # of the stream go, and the event to report once they have all arrived
        self._into: memoryview | None = None
        self._into_event: ReplyEvent | None = None
        # bytes of the read's data placed before ``_into`` when its chunk is the whole
        # read (a simple reply, or one OFFSET_DATA chunk covering it all), else -1
        self._into_placed = -1
        # reads whose destination still holds stale bytes somewhere (see expect_read)
        self._stale: set[int] = set()
        self._large = 0  # reads in flight of at least LARGE_READ bytes

    def expect_read(
        self, cookie: int, offset: int, length: int, dest: bytearray | None = None, *, stale: bool = False
    ) -> None:
        """``stale``: ``dest`` holds old bytes (it was not zeroed); the parser makes
        sure that every byte the server's reply does not fill ends as zero, as if it
        had been (holes, chunks that leave gaps, a reply without data)."""
        self._reads[cookie] = (offset, length, dest)
        if stale and dest is not None:
            self._stale.add(cookie)
        if length >= LARGE_READ:
            self._large += 1

    def forget(self, cookie: int) -> None:
        self._forget(cookie)
        self._stale.discard(cookie)

    def _forget(self, cookie: int) -> tuple[int, int, bytearray | None] | None:
        read = self._reads.pop(cookie, None)
        if read is not None and read[1] >= LARGE_READ:
            self._large -= 1
        return read

    def header_room(self) -> int | None:
        """How much a caller should receive at once while no read's data is due: with
        a large read in flight, little (the next reply may be its header, and what
        arrives with a header is copied; the rest lands in place), else no limit."""
        return HEADER_ROOM if self._large and self._into is None else None

    def _finish(self, cookie: int) -> None:
        """The read's reply is complete: a destination still stale was never written
        by a chunk at all, so it is all zeros."""
        read = self._forget(cookie)
        if cookie in self._stale:
            self._stale.discard(cookie)
            if read is not None and read[2] is not None:
                read[2][:] = bytes(len(read[2]))

    def _clean(self, cookie: int, dest: bytearray, start: int, n: int) -> None:
        """Before the first chunk lands at ``dest[start:start + n]``, zero the rest of
        a stale destination (later chunks overwrite their parts of it)."""
        if cookie in self._stale:
            self._stale.discard(cookie)
            if start:
                dest[:start] = bytes(start)
            if start + n < len(dest):
                dest[start + n :] = bytes(len(dest) - start - n)

    def want_into(self) -> memoryview | None:
        """Where the next bytes of the stream belong, if they are the rest of a read's
        data: a caller that can receive straight into this view (a BufferedProtocol)
        does so and reports with :meth:`received_into`; nothing is copied."""
        return self._into

    def whole_read_due(self) -> tuple[int, int] | None:
        """``(cookie, placed)`` when the next bytes of the stream are the rest of a read
        whose reply carries its data in one piece: its first ``placed`` bytes are in
        its destination already, and the next ``len(want_into())`` bytes of the stream
        are the rest, in order (a caller may move them elsewhere, then report them
        with :meth:`received_into`: the destination is then not written)."""
        if self._into is None or self._into_placed < 0:
            return None
        assert self._into_event is not None
        return self._into_event.cookie, self._into_placed

    def received_into(self, n: int) -> list[ReplyEvent]:
        """``n`` bytes were written at the start of :meth:`want_into`'s view."""
        event = self._filled(n)
        return [event] if event is not None else []

    def _filled(self, n: int) -> ReplyEvent | None:
        assert self._into is not None and 0 < n <= len(self._into)
        self._into = self._into[n:] if n < len(self._into) else None
        if self._into is not None:
            if self._into_placed >= 0:
                self._into_placed += n
            return None
        event, self._into_event = self._into_event, None
        assert event is not None
        if event.done:
            self._finish(event.cookie)
        return event

    def _start_into(
        self, cookie: int, dest: bytearray, start: int, n: int, head: int, event: ReplyEvent
    ) -> None:
        """The buffer holds a read's header (``head`` bytes) and the first part of its
        ``n`` bytes of data: copy that part to ``dest[start:]``; the rest goes there
        straight from the stream."""
        self._clean(cookie, dest, start, n)
        buf = self._buf
        have = len(buf) - head
        with memoryview(buf) as view:
            dest[start : start + have] = view[head:]
        buf.clear()
        self._into = memoryview(dest)[start + have : start + n]
        self._into_event = event
        self._into_placed = have if start == 0 and n == len(dest) else -1

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ReplyEvent]:
        events: list[ReplyEvent] = []
        if self._into is not None:
            n = min(len(data), len(self._into))
            self._into[:n] = data[:n]
            event = self._filled(n)
            if event is None:
                return events
            events.append(event)
            data = memoryview(data)[n:]
        self._buf += data
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def _next(self) -> ReplyEvent | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (magic,) = wire.U32.unpack_from(buf)
        if magic == SIMPLE_REPLY_MAGIC:
            if len(buf) < SIMPLE:
                return None
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(buf)
            read = self._reads.get(cookie)
            filled = 0
            if read is not None and not error:
                end = SIMPLE + read[1]
                dest = read[2]
                if len(buf) < end:
                    if dest is not None and len(dest) == read[1]:
                        event = ReplyEvent(cookie, True, offset=read[0], filled=read[1])
                        self._start_into(cookie, dest, 0, read[1], SIMPLE, event)
                    return None
                if dest is not None and len(dest) == read[1]:
                    with memoryview(buf) as view:
                        dest[:] = view[SIMPLE:end]
                    data, filled = b"", read[1]
                else:
                    data = bytes(buf[SIMPLE:end])
            else:
                end, data = SIMPLE, b""
            del buf[:end]
            if filled:
                self._stale.discard(cookie)  # filled whole
            self._finish(cookie)
            offset = read[0] if read else 0
            return ReplyEvent(cookie, True, error=error, offset=offset, data=data, filled=filled)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        if len(buf) < wire.CHUNK_HEADER.size:
            return None
        _, flags, ctype, cookie, length = wire.CHUNK_HEADER.unpack_from(buf)
        end = wire.CHUNK_HEADER.size + length
        done = bool(flags & REPLY_FLAG_DONE)
        read = self._reads.get(cookie)
        # data for a read with a destination: it goes there, not into a new bytes object
        into = ctype == _OFFSET_DATA and read is not None and read[2] is not None and length >= 9
        if len(buf) < end:
            head = wire.CHUNK_HEADER.size + 8
            if into and len(buf) >= head:
                assert read is not None and read[2] is not None
                offset, start, n = self._data_place(buf, read, end)
                event = ReplyEvent(cookie, done, offset=offset, filled=n)
                self._start_into(cookie, read[2], start, n, head, event)
            return None
        if into:
            assert read is not None
            event = self._data_into(buf, cookie, done, end, read)
        else:
            event = _chunk_event(cookie, done, ctype, bytes(buf[wire.CHUNK_HEADER.size : end]))
            if event.hole and read is not None and read[2] is not None:
                self._zero_hole(cookie, read[2], event.offset - read[0], event.hole)
        del buf[:end]
        if done:
            self._finish(cookie)
        return event

    def _zero_hole(self, cookie: int, dest: bytearray, start: int, n: int) -> None:
        if start < 0 or start + n > len(dest):
            raise RemoteProtocolError("read reply hole lies outside the request")
        self._clean(cookie, dest, start, n)
        dest[start : start + n] = bytes(n)

    def _data_into(
        self,
        buf: bytearray,
        cookie: int,
        done: bool,
        end: int,
        read: tuple[int, int, bytearray | None],
    ) -> ReplyEvent:
        """Copy an OFFSET_DATA chunk straight into the read's destination."""
        offset, start, n = self._data_place(buf, read, end)
        dest = read[2]
        assert dest is not None
        self._clean(cookie, dest, start, n)
        head = wire.CHUNK_HEADER.size + 8
        with memoryview(buf) as view:
            dest[start : start + n] = view[head:end]
        return ReplyEvent(cookie, done, offset=offset, filled=n)

    @staticmethod
    def _data_place(buf: bytearray, read: tuple[int, int, bytearray | None], end: int) -> tuple[int, int, int]:
        """An OFFSET_DATA chunk's offset, where its data starts in the read's
        destination, and its length (the chunk ends at ``end`` in ``buf``)."""
        head = wire.CHUNK_HEADER.size
        (offset,) = wire.U64.unpack_from(buf, head)
        start = offset - read[0]
        n = end - head - 8
        assert read[2] is not None
        if start < 0 or start + n > len(read[2]):
            raise RemoteProtocolError("read reply chunk lies outside the request")
        return offset, start, n


def _chunk_event(cookie: int, done: bool, ctype: int, payload: bytes) -> ReplyEvent:
    ev = ReplyEvent(cookie, done)
    if ctype == Chunk.NONE:
        if payload:
            raise RemoteProtocolError("NBD_REPLY_TYPE_NONE with a payload")
    elif ctype == Chunk.OFFSET_DATA:
        if len(payload) < 9:
            raise RemoteProtocolError("short OFFSET_DATA chunk")
        (ev.offset,) = wire.U64.unpack_from(payload)
        ev.data = payload[8:]
    elif ctype == Chunk.OFFSET_HOLE:
        if len(payload) != 12:
            raise RemoteProtocolError("OFFSET_HOLE chunk is not 12 bytes")
        ev.offset, ev.hole = wire.U64.unpack_from(payload)[0], wire.U32.unpack_from(payload, 8)[0]
    elif ctype == Chunk.BLOCK_STATUS:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise RemoteProtocolError("malformed BLOCK_STATUS chunk")
        (ev.context_id,) = wire.U32.unpack_from(payload)
        ev.extents = [wire.EXTENT.unpack_from(payload, p) for p in range(4, len(payload), 8)]
    elif ctype & 0x8000:
        if len(payload) < 6:
            raise RemoteProtocolError("short error chunk")
        ev.error, mlen = wire.ERROR_PAYLOAD.unpack_from(payload)
        if 6 + mlen > len(payload):
            raise RemoteProtocolError("error chunk message is longer than the chunk")
        ev.message = payload[6 : 6 + mlen].decode(errors="replace")
        if not ev.error:
            raise RemoteProtocolError("error chunk with error 0")
    else:
        raise RemoteProtocolError(f"unknown structured reply type {ctype}")
    return ev
