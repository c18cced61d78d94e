"""NBD wire format: magic numbers, flag bits, option/command codes and structs.

Shared by the server (protocol.py) and the client, so both sides speak from
one table. Values are plain ints (not enums) because they sit on the hot
path; NAMES maps them back to spellings for messages.
All integers on the wire are big-endian.
"""

from __future__ import annotations

import struct

# --- handshake ----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_INVALID = REP_ERR_BIT | 3
REP_ERR_PLATFORM = REP_ERR_BIT | 4
REP_ERR_TLS_REQD = REP_ERR_BIT | 5
REP_ERR_UNKNOWN = REP_ERR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT | 8
REP_ERR_TOO_BIG = REP_ERR_BIT | 9

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags (16 bits).
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- transmission -------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# Error values (errno-like, fixed by the protocol, not the host's errno).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation status flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"

# Strings (export names, queries) must not exceed this, per the spec.
MAX_STRING = 4096

# --- structs ------------------------------------------------------------------
# S: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
# C: client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT, option, length
OPTION_HEADER = struct.Struct(">QII")
# S: reply magic, option, reply type, length
OPTION_REPLY = struct.Struct(">QIII")
# S: reply to NBD_OPT_EXPORT_NAME: size, transmission flags
EXPORT_NAME_REPLY = struct.Struct(">QH")
# Payloads of NBD_REP_INFO.
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# C: magic, command flags, type, handle (cookie), offset, length
REQUEST = struct.Struct(">IHHQQI")
# S: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: magic, flags, type, handle, payload length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# A structured reply header followed by the offset of an OFFSET_DATA chunk.
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
# Structured reply header + offset + hole size of an OFFSET_HOLE chunk.
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")
# Payload start of an error chunk: error, message length.
ERROR_PAYLOAD = struct.Struct(">IH")
# One block status descriptor: length, status flags.
BLOCK_DESCRIPTOR = struct.Struct(">II")

NAMES: dict[str, dict[int, str]] = {
    "option": {
        OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
        OPT_PEEK_EXPORT: "PEEK_EXPORT", OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO",
        OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
    },
    "command": {
        CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
        CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
        CMD_BLOCK_STATUS: "BLOCK_STATUS",
    },
}


def name_of(kind: str, value: int) -> str:
    """A readable name for an option or command code, for messages."""
    return NAMES[kind].get(value, f"unknown({value})")
