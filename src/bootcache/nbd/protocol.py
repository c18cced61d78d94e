"""The NBD server protocol as a sans-I/O state machine, in the style of h11.

Bytes go in with :meth:`ServerConnection.receive_data`; events come out of
:meth:`ServerConnection.next_event` (or the ``NEED_DATA`` sentinel); bytes to
send come out of :meth:`ServerConnection.data_to_send` and the ``reply_*``
methods. No sockets, no asyncio: the transport (server.py) is a thin shell.

The option phase is negotiated here entirely, from the export catalogue the
connection is given. In the transmission phase every request is validated
here (magic, flags, bounds, read-only, payload size) and a bad one is
answered with an error reply without bothering the transport; only valid
requests become :class:`Request` events.

Buffering is bounded: an option may carry at most ``max_option`` bytes (more
is skipped and refused) and a write at most ``max_payload`` bytes (more is a
fatal :class:`ProtocolError`, as the stream cannot be resynchronised cheaply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from bootcache.block.layer import Extent
from bootcache.errors import BootcacheError
from bootcache.nbd import wire as w

MAX_PAYLOAD: Final = 32 << 20
MAX_OPTION: Final = 64 << 10
PREFERRED_BLOCK: Final = 4096
# Unparsed input allowed beyond one maximal request: the transport stops
# reading long before this when it is not keeping up.
_SLACK: Final = 8 << 20

_REQ_SIZE = w.REQUEST.size
_unpack_request = w.REQUEST.unpack_from
_pack_simple = w.SIMPLE_REPLY.pack
_pack_offset_data = w.OFFSET_DATA_HEADER.pack
_REQUEST_MAGIC = w.REQUEST_MAGIC
_CMD_READ = w.CMD_READ
_NOT_FUA = ~w.CMD_FLAG_FUA & 0xFFFF


class ProtocolError(BootcacheError):
    """The peer broke the protocol; the connection must be closed."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by next_event() when more bytes are needed.
NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the protocol needs to know about one export."""

    size: int
    read_only: bool = True
    description: str = ""
    #: Every connection shares one cache, so flush on one covers all.
    multi_conn: bool = True
    #: Write-zeroes is cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO).
    fast_zero: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission-phase request (never NBD_CMD_DISC)."""

    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS was acknowledged: flush data_to_send(), upgrade the transport
    to TLS, then call :meth:`ServerConnection.tls_started`."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Option haggling is over; transmission starts on ``export``."""

    export: str
    info: ExportInfo
    structured: bool
    #: Selected metadata contexts as (context id, name).
    contexts: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end the session (NBD_OPT_ABORT or NBD_CMD_DISC):
    finish in-flight requests, flush data_to_send(), close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side; ``clean`` is False in the middle of a message."""

    clean: bool


Event = Request | StartTLS | Ready | Disconnect | ConnectionClosed

# The generated __init__ of a frozen dataclass goes through object.__setattr__
# per field (about 1.3 us for Request); setting the slots directly is three
# times faster, and the instance is just as frozen afterwards.
_new = object.__new__
_set_command, _set_flags, _set_handle, _set_offset, _set_length, _set_data = (
    Request.__dict__[f].__set__ for f in ("command", "flags", "handle", "offset", "length",
                                          "data"))


def _request(command: int, flags: int, handle: int, offset: int, length: int,
             data: bytes) -> Request:
    r: Request = _new(Request)
    _set_command(r, command)
    _set_flags(r, flags)
    _set_handle(r, handle)
    _set_offset(r, offset)
    _set_length(r, length)
    _set_data(r, data)
    return r

# Connection states.
_CLIENT_FLAGS = "client-flags"
_OPTIONS = "options"
_TLS = "tls-handshake"
_TRANSMISSION = "transmission"
_DONE = "done"
_ERROR = "error"

_CONTEXT_IDS: Final = {w.CONTEXT_BASE_ALLOCATION: 1, w.CONTEXT_ALLOCATION_DEPTH: 2}

# Command flags each command accepts; FUA is accepted everywhere (clients
# are known to set it on reads), DF only once structured replies are on.
_ALLOWED_FLAGS: Final = {
    w.CMD_READ: w.CMD_FLAG_FUA | w.CMD_FLAG_DF,
    w.CMD_WRITE: w.CMD_FLAG_FUA,
    w.CMD_DISC: w.CMD_FLAG_FUA,
    w.CMD_FLUSH: w.CMD_FLAG_FUA,
    w.CMD_TRIM: w.CMD_FLAG_FUA,
    w.CMD_CACHE: w.CMD_FLAG_FUA,
    w.CMD_WRITE_ZEROES: w.CMD_FLAG_FUA | w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FAST_ZERO,
    w.CMD_BLOCK_STATUS: w.CMD_FLAG_FUA | w.CMD_FLAG_REQ_ONE,
}
_WRITING: Final = frozenset((w.CMD_WRITE, w.CMD_TRIM, w.CMD_WRITE_ZEROES))


def transmission_flags(info: ExportInfo, structured: bool) -> int:
    """The 16-bit transmission flags advertised for an export."""
    flags = w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_CACHE
    if info.read_only:
        flags |= w.FLAG_READ_ONLY
    else:
        flags |= (w.FLAG_SEND_FUA | w.FLAG_SEND_TRIM | w.FLAG_SEND_WRITE_ZEROES
                  | w.FLAG_SEND_FAST_ZERO)
    if info.multi_conn:
        flags |= w.FLAG_CAN_MULTI_CONN
    if structured:
        # Reads are always answered with one data chunk.
        flags |= w.FLAG_SEND_DF
    return flags


def extent_descriptors(extents: Iterable[Extent], offset: int, length: int,
                       context: str, req_one: bool = False) -> list[tuple[int, int]]:
    """Turn a layer's extents into (length, flags) descriptors for one
    metadata context: clipped to the request, merged where flags repeat."""
    depth = context == w.CONTEXT_ALLOCATION_DEPTH
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    for e in extents:
        if e.offset > pos or pos >= end:
            break  # a gap (or done): report only the covered prefix
        stop = min(e.offset + e.length, end)
        if stop <= pos:
            continue
        if depth:
            flags = e.depth
        else:
            flags = (0 if e.data else w.STATE_HOLE) | (w.STATE_ZERO if e.zero else 0)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + stop - pos, flags)
        else:
            out.append((stop - pos, flags))
        pos = stop
    if not out:
        # Status 0 is always a safe answer for base:allocation.
        out.append((length, 1 if depth else 0))
    return out[:1] if req_one else out


class ServerConnection:
    """Server side of one NBD connection.

    ``exports`` maps export names to what the protocol must know of them;
    the empty name selects the first export. ``tls`` says STARTTLS may be
    offered (the transport holds a certificate); ``tls_required`` refuses
    everything but STARTTLS and ABORT until TLS is up.
    """

    def __init__(self, exports: Mapping[str, ExportInfo], *, tls: bool = False,
                 tls_required: bool = False, max_payload: int = MAX_PAYLOAD,
                 max_option: int = MAX_OPTION) -> None:
        if tls_required and not tls:
            raise ValueError("tls_required needs tls")
        self.exports = exports
        self.tls = tls
        self.tls_required = tls_required
        self.tls_active = False
        self.max_payload = max_payload
        self.max_option = max_option
        self.state = _CLIENT_FLAGS
        self.structured = False
        self.no_zeroes = False
        self.export_name: str | None = None
        self.info: ExportInfo | None = None
        self.contexts: tuple[tuple[int, str], ...] = ()
        self._context_export: str | None = None
        self._shutting_down = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._skip = 0  # option bytes still to discard
        self._skip_option = 0
        self._out = bytearray(w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT,
                                              w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))
        self._error: ProtocolError | None = None
        # Fast-path copies of the export facts, set on entering transmission.
        self._size = 0
        self._read_only = True
        self._contexts_set = False

    # --- input ----------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not self._skip:
                self._reply_option(self._skip_option, w.REP_ERR_TOO_BIG,
                                   b"option data too long")
        self._buf += data
        if len(self._buf) - self._pos > self.max_payload + _SLACK:
            raise self._fail("client sent too much data without reading replies")

    def data_to_send(self) -> bytes:
        """Protocol-generated output (handshake, option replies, error replies)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The transport now runs TLS; option haggling resumes."""
        if self.state != _TLS:
            raise RuntimeError("tls_started() without StartTLS")
        self.state = _OPTIONS
        self.tls_active = True

    def input_drained(self) -> bool:
        """Every byte received is consumed and the peer has not closed: no
        event can be waiting (a cheaper answer than :meth:`next_event`'s)."""
        return self._pos == len(self._buf) and not self._eof

    def shutdown(self) -> None:
        """The server is stopping: refuse new options and requests."""
        self._shutting_down = True

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA; raises ProtocolError (fatal)."""
        if self.state is _TRANSMISSION:
            return self._next_request()
        return self._next_slow()

    # --- transmission phase (hot path) ------------------------------------------
    def take_reads(self, limit: int, max_bytes: int) -> list[tuple[int, ...]]:
        """The plain reads at the head of the input, taken off it: complete,
        valid NBD_CMD_READs (no flag but FUA) inside the disk, at most
        ``limit`` of them, and none once ``max_bytes`` are taken. Each is the
        unpacked request header, ``(magic, flags, command, handle, offset,
        length)``. A batch of these needs no event object per request; the
        first request that is anything else stays for :meth:`next_event`,
        so order is kept. Empty outside transmission."""
        if self.state is not _TRANSMISSION or self._shutting_down:
            return []
        buf = self._buf
        pos = self._pos
        count = min((len(buf) - pos) // _REQ_SIZE, limit)
        out: list[tuple[int, ...]] = []
        size, max_payload = self._size, self.max_payload
        taken = 0
        for _ in range(count):
            r = _unpack_request(buf, pos)
            # r: magic, flags, command, handle, offset, length
            if (r[0] != _REQUEST_MAGIC or r[2] != _CMD_READ or r[1] & _NOT_FUA
                    or not 0 < r[5] <= max_payload or r[4] + r[5] > size or taken >= max_bytes):
                break
            out.append(r)
            taken += r[5]
            pos += _REQ_SIZE
        if pos != self._pos:
            if pos == len(buf):
                buf.clear()
                pos = 0
            self._pos = pos
        return out

    def _next_request(self) -> Event | _NeedData:
        buf = self._buf
        while True:
            pos = self._pos
            avail = len(buf) - pos
            if avail < _REQ_SIZE:
                return self._need_data(avail)
            magic, flags, cmd, handle, offset, length = _unpack_request(buf, pos)
            if magic != w.REQUEST_MAGIC:
                raise self._fail(f"bad request magic {magic:#x}")
            if cmd == w.CMD_WRITE:
                if length > self.max_payload:
                    raise self._fail(f"write of {length} bytes exceeds the "
                                     f"{self.max_payload}-byte limit")
                end = pos + _REQ_SIZE + length
                if len(buf) < end:
                    return self._need_data(avail)
                with memoryview(buf) as view:
                    data = bytes(view[pos + _REQ_SIZE:end])
                self._pos = end
            else:
                data = b""
                self._pos = pos + _REQ_SIZE
            # Common case first: a valid read or write inside the disk.
            if (cmd <= w.CMD_WRITE and not flags & ~w.CMD_FLAG_FUA and length > 0
                    and offset + length <= self._size
                    and ((cmd == w.CMD_READ and length <= self.max_payload)
                         or (cmd == w.CMD_WRITE and not self._read_only))
                    and not self._shutting_down):
                return _request(cmd, flags, handle, offset, length, data)
            if cmd == w.CMD_DISC:
                self.state = _DONE
                return Disconnect()
            error = self._check(cmd, flags, offset, length)
            if error < 0:
                self._out += self.reply_done(handle, cmd)
            elif error:
                self._out += self.reply_error(handle, error, _ERROR_TEXT[error])
            else:
                return _request(cmd, flags, handle, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """0 if the request is valid, -1 if it is trivially done (empty),
        else the NBD error to reply with."""
        if self._shutting_down:
            return w.ESHUTDOWN
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return w.EINVAL
        if not self.structured:
            allowed &= ~w.CMD_FLAG_DF
        if flags & ~allowed:
            return w.EINVAL
        if cmd in _WRITING and self._read_only:
            return w.EPERM
        if cmd == w.CMD_FLUSH:
            return 0
        if offset + length > self._size:
            return w.ENOSPC if cmd in _WRITING else w.EINVAL
        if cmd == w.CMD_BLOCK_STATUS:
            return 0 if length and self._contexts_set else w.EINVAL
        if cmd == w.CMD_READ and length > self.max_payload:
            return w.EINVAL
        if cmd == w.CMD_WRITE_ZEROES and flags & w.CMD_FLAG_FAST_ZERO:
            assert self.info is not None
            if not self.info.fast_zero or flags & w.CMD_FLAG_NO_HOLE:
                return w.ENOTSUP
        return 0 if length else -1

    def _need_data(self, avail: int) -> ConnectionClosed | _NeedData:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        if self._eof:
            self.state = _DONE
            return ConnectionClosed(clean=avail == 0)
        return NEED_DATA

    # --- replies ----------------------------------------------------------------
    def reply_ok(self, handle: int) -> bytes:
        """Success without payload (a simple reply is valid even when
        structured replies are on, for every command but READ)."""
        return _pack_simple(w.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_done(self, handle: int, command: int) -> bytes:
        """Success without payload for any command, even an empty READ."""
        if command == w.CMD_READ and self.structured:
            return w.STRUCTURED_REPLY.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                           w.REPLY_TYPE_NONE, handle, 0)
        return _pack_simple(w.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """An error reply: an error chunk if structured, else a simple reply."""
        if not self.structured:
            return _pack_simple(w.SIMPLE_REPLY_MAGIC, error, handle)
        text = message.encode()[:w.MAX_STRING]
        return (w.STRUCTURED_REPLY.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                        w.REPLY_TYPE_ERROR, handle,
                                        w.ERROR_PAYLOAD.size + len(text))
                + w.ERROR_PAYLOAD.pack(error, len(text)) + text)

    def read_header(self, handle: int, offset: int, length: int) -> bytes:
        """The header to send in front of ``length`` bytes of read data."""
        if self.structured:
            return _pack_offset_data(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                     w.REPLY_TYPE_OFFSET_DATA, handle, length + 8, offset)
        return _pack_simple(w.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_block_status(self, handle: int,
                           chunks: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> bytes:
        """One block-status chunk per (context id, descriptors)."""
        out = bytearray()
        last = len(chunks) - 1
        for i, (context_id, descriptors) in enumerate(chunks):
            out += w.STRUCTURED_REPLY.pack(
                w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE if i == last else 0,
                w.REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * len(descriptors))
            out += w.U32.pack(context_id)
            for length, flags in descriptors:
                out += w.BLOCK_DESCRIPTOR.pack(length, flags)
        return bytes(out)

    # --- handshake and option phase -----------------------------------------------
    def _next_slow(self) -> Event | _NeedData:
        if self.state is _ERROR:
            assert self._error is not None
            raise self._error
        while True:
            if self.state is _DONE:
                return NEED_DATA
            if self.state is _TLS:
                if len(self._buf) > self._pos:
                    raise self._fail("data received before the TLS upgrade")
                return NEED_DATA
            if self.state is _TRANSMISSION:
                return self._next_request()
            if self._skip:
                return self._need_data(len(self._buf) - self._pos)
            avail = len(self._buf) - self._pos
            if self.state is _CLIENT_FLAGS:
                if avail < 4:
                    return self._need_data(avail)
                (flags,) = w.CLIENT_FLAGS.unpack_from(self._buf, self._pos)
                self._pos += 4
                if flags & ~(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES):
                    raise self._fail(f"unknown client flags {flags:#x}")
                self.no_zeroes = bool(flags & w.FLAG_C_NO_ZEROES)
                self.state = _OPTIONS
                continue
            if avail < w.OPTION_HEADER.size:
                return self._need_data(avail)
            magic, option, length = w.OPTION_HEADER.unpack_from(self._buf, self._pos)
            if magic != w.IHAVEOPT:
                raise self._fail(f"bad option magic {magic:#x}")
            if length > self.max_option:
                if option == w.OPT_EXPORT_NAME:
                    raise self._fail("export name too long")
                # Discard the data as it arrives, then refuse the option.
                self._pos += w.OPTION_HEADER.size
                rest = len(self._buf) - self._pos
                take = min(rest, length)
                self._pos += take
                self._skip, self._skip_option = length - take, option
                if not self._skip:
                    self._reply_option(option, w.REP_ERR_TOO_BIG, b"option data too long")
                continue
            if avail < w.OPTION_HEADER.size + length:
                return self._need_data(avail)
            start = self._pos + w.OPTION_HEADER.size
            data = bytes(self._buf[start:start + length])
            self._pos = start + length
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == w.OPT_ABORT:
            self._reply_option(option, w.REP_ACK)
            self.state = _DONE
            return Disconnect()
        if self._shutting_down:
            if option == w.OPT_EXPORT_NAME:
                raise self._fail("server is shutting down")
            return self._answer(option, w.REP_ERR_SHUTDOWN, b"server shutting down")
        if self.tls_required and not self.tls_active and option != w.OPT_STARTTLS:
            if option == w.OPT_EXPORT_NAME:
                raise self._fail("TLS is required")
            return self._answer(option, w.REP_ERR_TLS_REQD, b"TLS is required")
        if option == w.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == w.OPT_LIST:
            if data:
                return self._answer(option, w.REP_ERR_INVALID, b"LIST takes no data")
            for name in self.exports:
                raw = name.encode()
                self._reply_option(option, w.REP_SERVER, w.U32.pack(len(raw)) + raw)
            return self._answer(option, w.REP_ACK)
        if option == w.OPT_STARTTLS:
            if data:
                return self._answer(option, w.REP_ERR_INVALID, b"STARTTLS takes no data")
            if not self.tls:
                return self._answer(option, w.REP_ERR_POLICY, b"TLS not configured")
            if self.tls_active:
                return self._answer(option, w.REP_ERR_INVALID, b"TLS already active")
            self._reply_option(option, w.REP_ACK)
            # Negotiation state from before TLS must not survive it.
            self.structured = False
            self.contexts, self._context_export = (), None
            self.state = _TLS
            return StartTLS()
        if option in (w.OPT_INFO, w.OPT_GO):
            return self._info_go(option, data)
        if option == w.OPT_STRUCTURED_REPLY:
            if data:
                return self._answer(option, w.REP_ERR_INVALID,
                                    b"STRUCTURED_REPLY takes no data")
            self.structured = True
            return self._answer(option, w.REP_ACK)
        if option in (w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        return self._answer(option, w.REP_ERR_UNSUP,
                            f"option {w.name_of('option', option)} unsupported".encode())

    def _lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        if name == "" and self.exports:
            name = next(iter(self.exports))
        info = self.exports.get(name)
        return None if info is None else (name, info)

    def _export_name(self, data: bytes) -> Event:
        name = _decode(data)
        found = None if name is None else self._lookup(name)
        if found is None:
            raise self._fail(f"unknown export {data[:64]!r}")
        out = w.EXPORT_NAME_REPLY.pack(found[1].size,
                                       transmission_flags(found[1], self.structured))
        self._out += out if self.no_zeroes else out + bytes(124)
        return self._enter_transmission(*found)

    def _info_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            return self._answer(option, w.REP_ERR_INVALID, b"option too short")
        (name_len,) = w.U32.unpack_from(data, 0)
        if name_len > len(data) - 6 or name_len > w.MAX_STRING:
            return self._answer(option, w.REP_ERR_INVALID, b"bad name length")
        (count,) = w.U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            return self._answer(option, w.REP_ERR_INVALID, b"bad request count")
        name = _decode(data[4:4 + name_len])
        if name is None:
            return self._answer(option, w.REP_ERR_INVALID, b"name is not UTF-8")
        found = self._lookup(name)
        if found is None:
            return self._answer(option, w.REP_ERR_UNKNOWN,
                                f"no export named {name!r}".encode()[:w.MAX_STRING])
        canonical, info = found
        wanted = {w.U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)}
        self._reply_option(option, w.REP_INFO, w.INFO_EXPORT_PAYLOAD.pack(
            w.INFO_EXPORT, info.size, transmission_flags(info, self.structured)))
        if w.INFO_NAME in wanted:
            self._reply_option(option, w.REP_INFO, w.U16.pack(w.INFO_NAME) + canonical.encode())
        if w.INFO_DESCRIPTION in wanted and info.description:
            self._reply_option(option, w.REP_INFO, w.U16.pack(w.INFO_DESCRIPTION)
                               + info.description.encode()[:w.MAX_STRING])
        # Any alignment is accepted; the sizes only guide the client.
        self._reply_option(option, w.REP_INFO, w.INFO_BLOCK_SIZE_PAYLOAD.pack(
            w.INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, self.max_payload))
        self._reply_option(option, w.REP_ACK)
        if option == w.OPT_GO:
            return self._enter_transmission(canonical, info)
        return None

    def _meta_context(self, option: int, data: bytes) -> Event | None:
        setting = option == w.OPT_SET_META_CONTEXT
        if setting:
            self.contexts, self._context_export = (), None
            if not self.structured:
                return self._answer(option, w.REP_ERR_INVALID,
                                    b"structured replies not negotiated")
        parsed = _parse_meta_request(data)
        if parsed is None:
            return self._answer(option, w.REP_ERR_INVALID, b"malformed request")
        name, queries = parsed
        found = self._lookup(name)
        if found is None:
            return self._answer(option, w.REP_ERR_UNKNOWN,
                                f"no export named {name!r}".encode()[:w.MAX_STRING])
        selected: list[str] = []
        for query in queries if queries or setting else ["base:", "qemu:"]:
            for ctx in _CONTEXT_IDS:
                # LIST accepts a bare namespace as a wildcard; SET needs exact names.
                hit = ctx == query or (not setting and query.endswith(":")
                                       and ctx.startswith(query))
                if hit and ctx not in selected:
                    selected.append(ctx)
        for ctx in selected:
            ctx_id = _CONTEXT_IDS[ctx] if setting else 0
            self._reply_option(option, w.REP_META_CONTEXT, w.U32.pack(ctx_id) + ctx.encode())
        if setting:
            self.contexts = tuple((_CONTEXT_IDS[c], c) for c in selected)
            self._context_export = found[0]
        return self._answer(option, w.REP_ACK)

    def _enter_transmission(self, name: str, info: ExportInfo) -> Ready:
        if self._context_export != name:
            self.contexts = ()  # contexts were negotiated for another export
        self.export_name, self.info = name, info
        self._size, self._read_only = info.size, info.read_only
        self._contexts_set = bool(self.contexts)
        self.state = _TRANSMISSION
        return Ready(name, info, self.structured, self.contexts)

    def _answer(self, option: int, reply: int, data: bytes = b"") -> Event | None:
        """Reply to an option that does not end the haggling (so: no event)."""
        self._reply_option(option, reply, data)
        return None

    def _reply_option(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _fail(self, message: str) -> ProtocolError:
        self.state = _ERROR
        self._error = ProtocolError(message)
        return self._error


_ERROR_TEXT: Final = {
    w.EPERM: "export is read-only", w.EINVAL: "invalid request",
    w.ENOSPC: "request lies past the end of the disk", w.ENOTSUP: "not supported",
    w.ESHUTDOWN: "server is shutting down",
}


def _decode(raw: bytes) -> str | None:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Export name and queries of a LIST/SET_META_CONTEXT option, or None."""
    if len(data) < 8:
        return None
    (name_len,) = w.U32.unpack_from(data, 0)
    if name_len > w.MAX_STRING or 4 + name_len + 4 > len(data):
        return None
    name = _decode(data[4:4 + name_len])
    pos = 4 + name_len
    (count,) = w.U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qlen,) = w.U32.unpack_from(data, pos)
        pos += 4
        if qlen > w.MAX_STRING or pos + qlen > len(data):
            return None
        query = _decode(data[pos:pos + qlen])
        if query is None:
            return None
        queries.append(query)
        pos += qlen
    if pos != len(data) or name is None:
        return None
    return name, queries
