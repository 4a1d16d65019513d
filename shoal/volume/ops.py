"""Journal operations and their encoding (docs/FORMAT.md §4.1).

An operation is a value; :mod:`shoal.volume.meta` applies it. Encoding is
``opcode u8, body length u16, body``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from shoal.volume.errors import VolumeCorrupt

FILE = 1
DIRECTORY = 2
PREALLOCATED = 1


class Create(NamedTuple):
    ino: int
    parent: int
    kind: int
    flags: int
    mtime_ns: int
    name: str


class Remove(NamedTuple):
    parent: int
    name: str


class Rename(NamedTuple):
    src_parent: int
    dst_parent: int
    mtime_ns: int
    src_name: str
    dst_name: str


class SetSize(NamedTuple):
    ino: int
    size: int
    mtime_ns: int


class Map(NamedTuple):
    ino: int
    file_unit: int
    unit: int
    n: int


class Unmap(NamedTuple):
    ino: int
    file_unit: int
    n: int


class Remap(NamedTuple):
    ino: int
    file_unit: int
    unit: int
    n: int


Op = Create | Remove | Rename | SetSize | Map | Unmap | Remap

_HEAD = struct.Struct("<BH")
_CREATE = struct.Struct("<QQBBQB")
_REMOVE = struct.Struct("<QB")
_RENAME = struct.Struct("<QQQB")
_SETSIZE = struct.Struct("<QQQ")
_MAP = struct.Struct("<QQQI")
_UNMAP = struct.Struct("<QQI")


def _name(n: str) -> bytes:
    return n.encode()


def encode(op: Op) -> bytes:
    if isinstance(op, Create):
        nb = _name(op.name)
        code, body = 1, _CREATE.pack(op.ino, op.parent, op.kind, op.flags, op.mtime_ns, len(nb)) + nb
    elif isinstance(op, Remove):
        nb = _name(op.name)
        code, body = 2, _REMOVE.pack(op.parent, len(nb)) + nb
    elif isinstance(op, Rename):
        s, d = _name(op.src_name), _name(op.dst_name)
        code, body = 3, _RENAME.pack(op.src_parent, op.dst_parent, op.mtime_ns, len(s)) + s + bytes([len(d)]) + d
    elif isinstance(op, SetSize):
        code, body = 4, _SETSIZE.pack(op.ino, op.size, op.mtime_ns)
    elif isinstance(op, Map):
        code, body = 5, _MAP.pack(op.ino, op.file_unit, op.unit, op.n)
    elif isinstance(op, Unmap):
        code, body = 6, _UNMAP.pack(op.ino, op.file_unit, op.n)
    elif isinstance(op, Remap):
        code, body = 7, _MAP.pack(op.ino, op.file_unit, op.unit, op.n)
    else:  # pragma: no cover - exhaustive
        raise TypeError(op)
    return _HEAD.pack(code, len(body)) + body


def decode_all(payload: bytes, count: int) -> list[Op]:
    """Decode ``count`` operations; a malformed payload is journal damage."""
    ops: list[Op] = []
    pos = 0
    try:
        for _ in range(count):
            code, length = _HEAD.unpack_from(payload, pos)
            body = payload[pos + 3 : pos + 3 + length]
            if len(body) != length:
                raise ValueError("short body")
            pos += 3 + length
            ops.append(_decode_one(code, body))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise VolumeCorrupt("a journal record holds a malformed operation", what="journal") from err
    return ops


def _decode_one(code: int, body: bytes) -> Op:
    if code == 1:
        ino, parent, kind, flags, mtime, nlen = _CREATE.unpack_from(body)
        return Create(ino, parent, kind, flags, mtime, body[_CREATE.size : _CREATE.size + nlen].decode())
    if code == 2:
        parent, nlen = _REMOVE.unpack_from(body)
        return Remove(parent, body[_REMOVE.size : _REMOVE.size + nlen].decode())
    if code == 3:
        sp, dp, mtime, slen = _RENAME.unpack_from(body)
        p = _RENAME.size
        src = body[p : p + slen].decode()
        dlen = body[p + slen]
        dst = body[p + slen + 1 : p + slen + 1 + dlen].decode()
        return Rename(sp, dp, mtime, src, dst)
    if code == 4:
        return SetSize(*_SETSIZE.unpack_from(body))
    if code == 5:
        return Map(*_MAP.unpack_from(body))
    if code == 6:
        return Unmap(*_UNMAP.unpack_from(body))
    if code == 7:
        return Remap(*_MAP.unpack_from(body))
    raise ValueError(f"unknown opcode {code}")
