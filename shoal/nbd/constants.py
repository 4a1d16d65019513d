"""Numbers of the NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``).

Every value on the wire is big-endian. Names follow the spec without the
``NBD_`` prefix, grouped in IntEnums so logs print names, not numbers.
"""

from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: handshake flags (server, 16 bits)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
#: client flags (32 bits)
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class TxFlag(enum.IntFlag):
    """Transmission flags (16 bits), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11
    # shoal's private options (fencing, docs/NBD.md). The spec numbers its options
    # upwards from 1 and says nothing of private ones; "SH" in the top half keeps
    # clear of every number it will plausibly ever assign.
    SHOAL_REGISTER = 0x53480001
    SHOAL_PREEMPT = 0x53480002


REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR + 1
    ERR_POLICY = REP_ERR + 2
    ERR_INVALID = REP_ERR + 3
    ERR_PLATFORM = REP_ERR + 4
    ERR_TLS_REQD = REP_ERR + 5
    ERR_UNKNOWN = REP_ERR + 6
    ERR_SHUTDOWN = REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = REP_ERR + 8
    ERR_TOO_BIG = REP_ERR + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: structured reply flag
REPLY_FLAG_DONE = 1 << 0


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


#: ``base:allocation`` descriptor flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"

# error values (not host errno: the spec fixes these numbers)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

#: strings (export names, messages) MUST be no longer than this
MAX_STRING = 4096
#: option payloads larger than this are treated as a denial of service
MAX_OPTION_LENGTH = 64 * 1024
#: default maximum block size: the largest READ/WRITE we accept
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
