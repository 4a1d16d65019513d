"""Fixed-layout structures of the NBD wire format, as precompiled ``struct`` objects.

All big-endian. Sizes in bytes are given next to each; docs/NBD.md draws them.
"""

from __future__ import annotations

import struct

#: S: NBDMAGIC, IHAVEOPT, handshake flags (18)
GREETING = struct.Struct(">QQH")
#: C: client flags (4)
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, option, length (16)
OPTION_HEADER = struct.Struct(">QII")
#: S: reply magic, option, reply type, length (20)
OPTION_REPLY = struct.Struct(">QIII")
#: S: export size, transmission flags (10) -- reply to NBD_OPT_EXPORT_NAME
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT: info type, size, transmission flags (12)
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE: info type, minimum, preferred, maximum (14)
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
#: C: magic, command flags, type, cookie, offset, length (28)
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, error, cookie (16)
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, flags, type, cookie, payload length (20)
CHUNK_HEADER = struct.Struct(">IHHQI")
#: S: chunk header + offset: the start of an OFFSET_DATA chunk (28)
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")
#: S: chunk header + offset + hole size: a whole OFFSET_HOLE chunk (32)
HOLE_CHUNK = struct.Struct(">IHHQIQI")
#: payload of an error chunk: error, message length (6)
ERROR_PAYLOAD = struct.Struct(">IH")
#: one block status descriptor: length, flags (8)
EXTENT = struct.Struct(">II")

NO_ZEROES_PAD = bytes(124)
