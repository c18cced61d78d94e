"""Asyncio NBD client, and the byte source built on it.

    nbd://host[:port]/export        nbds://host[:port]/export      (TLS)
    nbd+unix:///export?socket=PATH  nbds+unix:///export?socket=PATH

One :class:`NbdConnection` is one socket after the fixed-newstyle handshake
(STARTTLS when asked, structured replies when offered, NBD_OPT_GO with a
fallback to NBD_OPT_EXPORT_NAME). Requests are multiplexed on it by handle;
a reader task routes replies back. Wire constants and structs come from
``bootcache.nbd.wire``, shared with the server.

Failures are split by what they mean for the connection, as ovirt-imageio
does: a broken socket or a protocol violation kills the connection (every
pending request fails, the next attempt opens a new one), while an error
the server reports for one request (EIO, EINVAL...) leaves it usable. Both
reach :class:`NbdSource` as TransientError or SourceError, and it retries
through the shared resilience machinery like the HTTP and S3 sources.

:class:`NbdSource` opens several connections when the server advertises
multi-conn, and sends each request on the least busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from bootcache.errors import SourceError
from bootcache.nbd import wire as w
from bootcache.sources.priority import is_background
from bootcache.sources.resilience import (
    RemoteOptions,
    RemoteSource,
    SourceChangedError,
    TransientError,
    check_body,
    describe,
    gather_all,
)

DEFAULT_PORT = 10809
_OLDSTYLE_MAGIC = 0x00420281861253
# Largest option reply we accept: replies are tiny; a huge one is a broken peer.
_MAX_OPTION_REPLY = 64 * 1024
# Without a server-advertised maximum the spec says not to exceed 32 MiB.
_DEFAULT_MAX_BLOCK = 32 << 20
# Server-reported errors worth a retry: the condition may pass.
_TRANSIENT_ERRNOS = frozenset({w.EIO, w.ENOMEM, w.ESHUTDOWN})
_ERRNO_NAMES = {w.EPERM: "EPERM", w.EIO: "EIO", w.ENOMEM: "ENOMEM", w.EINVAL: "EINVAL",
                w.ENOSPC: "ENOSPC", w.EOVERFLOW: "EOVERFLOW", w.ENOTSUP: "ENOTSUP",
                w.ESHUTDOWN: "ESHUTDOWN"}


class NbdProtocolError(TransientError):
    """The peer broke the protocol; the connection is dropped (a new one may do)."""


class NbdRequestError(SourceError):
    """The server failed one request; ``errno`` is the NBD error value."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class NbdTransientRequestError(NbdRequestError, TransientError):
    """A per-request error that may pass (EIO, ENOMEM, ESHUTDOWN)."""


def request_error(name: str, what: str, errno: int, message: str = "") -> NbdRequestError:
    text = f"{name}: {what}: server error {_ERRNO_NAMES.get(errno, errno)}"
    if message:
        text += f" ({message})"
    cls = NbdTransientRequestError if errno in _TRANSIENT_ERRNOS else NbdRequestError
    return cls(text, errno)


# -- addresses and TLS -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export is: a TCP host/port or a Unix socket, and its name."""

    uri: str
    export: str
    tls: bool
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls_hostname: str | None = None
    tls_certificates: str | None = None
    tls_verify_peer: bool = True


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI (the forms QEMU and libnbd accept)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+tcp", "nbds+tcp", "nbd+unix", "nbds+unix"):
        raise ValueError(f"{uri}: not an NBD URI")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    tls = scheme.startswith("nbds")
    verify = query.get("tls-verify-peer", "true").lower() not in ("false", "0", "no", "off")
    common: dict[str, Any] = {"uri": uri, "export": export, "tls": tls,
                              "tls_hostname": query.get("tls-hostname"),
                              "tls_certificates": query.get("tls-certificates"),
                              "tls_verify_peer": verify}
    if len(export.encode()) > w.MAX_STRING:
        raise ValueError(f"{uri}: export name longer than {w.MAX_STRING} bytes")
    if scheme.endswith("+unix"):
        sock = query.get("socket")
        if not sock or parts.netloc:
            raise ValueError(f"{uri}: expected {scheme}:///export?socket=PATH")
        return NbdAddress(socket=sock, **common)
    if not parts.hostname:
        raise ValueError(f"{uri}: no host")
    return NbdAddress(host=parts.hostname, port=parts.port or DEFAULT_PORT, **common)


def tls_context(addr: NbdAddress, *, ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """Client TLS settings; ``tls-certificates=DIR`` reads ca-cert.pem and
    client-cert.pem / client-key.pem from DIR, as libnbd and QEMU do."""
    if addr.tls_certificates:
        d = addr.tls_certificates
        ca_file = ca_file or _existing(os.path.join(d, "ca-cert.pem"))
        cert_file = cert_file or _existing(os.path.join(d, "client-cert.pem"))
        key_file = key_file or _existing(os.path.join(d, "client-key.pem"))
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if insecure or not addr.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _existing(path: str) -> str | None:
    return path if os.path.exists(path) else None


# -- one connection ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake told us about the export."""

    size: int
    flags: int
    structured: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = _DEFAULT_MAX_BLOCK

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & w.FLAG_CAN_MULTI_CONN)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & w.FLAG_READ_ONLY)


class _Read:
    """A read in flight: where its reply chunks go."""

    __slots__ = ("background", "covered", "data", "error", "future", "length", "offset")

    def __init__(self, offset: int, length: int, future: asyncio.Future[bytes],
                 background: bool = False) -> None:
        self.offset = offset
        self.length = length
        self.future = future
        #: A background reader's (sources/priority.py): demand reads avoid its connection.
        self.background = background
        self.data: bytes | bytearray | None = None
        self.covered = 0
        self.error: SourceError | None = None

    def place(self, offset: int, chunk: bytes) -> None:
        """Store an OFFSET_DATA chunk (zero-copy when it is the whole read)."""
        if offset == self.offset and len(chunk) == self.length and self.data is None:
            self.data = chunk
        else:
            if not isinstance(self.data, bytearray):
                buf = bytearray(self.length)
                if self.data is not None:
                    buf[:] = self.data
                self.data = buf
            start = offset - self.offset
            self.data[start:start + len(chunk)] = chunk
        self.covered += len(chunk)

    def hole(self, length: int) -> None:
        if self.data is None:
            self.data = bytearray(self.length)
        elif not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        self.covered += length  # the buffer starts as zeros

    def finish(self, name: str) -> None:
        if self.future.done():
            return  # the caller gave up (timeout, cancel); drop the reply
        if self.error is not None:
            self.future.set_exception(self.error)
        elif self.covered != self.length:
            self.future.set_exception(NbdProtocolError(
                f"{name}: read {self.offset}+{self.length}: reply covered "
                f"{self.covered} bytes"))
        else:
            self.future.set_result(bytes(self.data or b""))


class NbdConnection:
    """One handshaken connection; reads are multiplexed by handle."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: ExportInfo) -> None:
        self.name = name
        self.info = info
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, _Read] = {}
        #: How many of the pending reads are background reads.
        self.background_pending = 0
        self._next_handle = 1
        self._broken: SourceError | None = None
        self.last_progress = time.monotonic()
        self._task = asyncio.create_task(self._receive_loop())

    @classmethod
    async def connect(cls, addr: NbdAddress, *, tls: ssl.SSLContext | None = None,
                      name: str | None = None) -> NbdConnection:
        """Open a socket and run the handshake (the caller bounds the time)."""
        name = name or addr.uri
        try:
            if addr.socket is not None:
                reader, writer = await asyncio.open_unix_connection(addr.socket, limit=1 << 20)
            else:
                reader, writer = await asyncio.open_connection(addr.host, addr.port,
                                                               limit=1 << 20)
        except OSError as e:
            raise TransientError(f"{name}: cannot connect: {describe(e)}") from e
        try:
            info = await _Handshake(name, addr, reader, writer, tls).run()
        except BaseException:
            writer.close()
            raise
        return cls(name, reader, writer, info)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def stalled(self, limit: float) -> bool:
        """Requests are waiting and nothing arrived for ``limit`` seconds."""
        return bool(self._pending) and time.monotonic() - self.last_progress > limit

    async def pread(self, offset: int, length: int) -> bytes:
        if self._broken is not None:
            raise self._broken
        handle = self._next_handle
        self._next_handle += 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self.last_progress = time.monotonic()
        req = self._pending[handle] = _Read(offset, length, fut, is_background())
        self.background_pending += req.background
        try:
            self._writer.write(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, handle,
                                              offset, length))
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._fail(TransientError(f"{self.name}: send failed: {describe(e)}"))
        # Cancellation leaves the entry: its reply must still be read off the wire.
        return await fut

    async def _receive_loop(self) -> None:
        read = self._reader.readexactly
        try:
            while True:
                magic = w.U32.unpack(await read(4))[0]
                self.last_progress = time.monotonic()
                if magic == w.STRUCTURED_REPLY_MAGIC and self.info.structured:
                    await self._structured_chunk(await read(16))
                elif magic == w.SIMPLE_REPLY_MAGIC:
                    error, handle = w.SIMPLE_REPLY.unpack(w.U32.pack(magic) + await read(12))[1:]
                    req = self._take(handle)
                    if error:
                        req.error = request_error(self.name, f"read {req.offset}+{req.length}",
                                                  error)
                    else:
                        req.place(req.offset, await read(req.length))
                    req.finish(self.name)
                else:
                    raise NbdProtocolError(f"{self.name}: bad reply magic 0x{magic:08x}")
        except NbdProtocolError as e:
            self._fail(e)
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError) as e:
            self._fail(TransientError(f"{self.name}: connection lost: {describe(e)}"))
        except asyncio.CancelledError:
            self._fail(TransientError(f"{self.name}: connection closed"))
            raise
        except Exception as e:
            # Never leave requests waiting on a reader that died of a surprise.
            self._fail(NbdProtocolError(f"{self.name}: reply handling failed: {describe(e)}"))

    async def _structured_chunk(self, head: bytes) -> None:
        flags, kind, handle, size = w.STRUCTURED_REPLY.unpack(bytes(4) + head)[1:]
        req = self._pending.get(handle)
        if req is None:
            raise NbdProtocolError(f"{self.name}: reply for unknown handle {handle}")
        read = self._reader.readexactly
        end = req.offset + req.length
        if kind == w.REPLY_TYPE_OFFSET_DATA:
            if size < 8:
                raise NbdProtocolError(f"{self.name}: short OFFSET_DATA chunk")
            off = w.U64.unpack(await read(8))[0]
            if off < req.offset or off + size - 8 > end:
                raise NbdProtocolError(f"{self.name}: data chunk {off}+{size - 8} outside "
                                       f"read {req.offset}+{req.length}")
            req.place(off, await read(size - 8))
        elif kind == w.REPLY_TYPE_OFFSET_HOLE:
            if size != 12:
                raise NbdProtocolError(f"{self.name}: bad OFFSET_HOLE chunk")
            off, hole = w.OFFSET_HOLE_CHUNK.unpack(bytes(20) + await read(12))[5:]
            if off < req.offset or off + hole > end:
                raise NbdProtocolError(f"{self.name}: hole chunk outside the read")
            req.hole(hole)
        elif kind in (w.REPLY_TYPE_ERROR, w.REPLY_TYPE_ERROR_OFFSET) or kind & (1 << 15):
            payload = await read(size) if size <= _MAX_OPTION_REPLY else b""
            if len(payload) < 6:
                raise NbdProtocolError(f"{self.name}: bad error chunk")
            errno, msg_len = w.ERROR_PAYLOAD.unpack_from(payload)
            message = payload[6:6 + msg_len].decode("utf-8", "replace")
            req.error = request_error(self.name, f"read {req.offset}+{req.length}",
                                      errno or w.EIO, message)
        elif kind == w.REPLY_TYPE_NONE:
            if size or not flags & w.REPLY_FLAG_DONE:
                raise NbdProtocolError(f"{self.name}: bad NONE chunk")
        else:
            raise NbdProtocolError(f"{self.name}: unexpected reply chunk type {kind}")
        if flags & w.REPLY_FLAG_DONE:
            self._take(handle)
            req.finish(self.name)

    def _take(self, handle: int) -> _Read:
        req = self._pending.pop(handle, None)
        if req is None:
            raise NbdProtocolError(f"{self.name}: reply for unknown handle {handle}")
        self.background_pending -= req.background
        return req

    def _fail(self, error: SourceError) -> None:
        """The connection is unusable: fail everything pending and close."""
        if self._broken is None:
            self._broken = error
        pending, self._pending = self._pending, {}
        self.background_pending = 0
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(error)
        with contextlib.suppress(Exception):
            self._writer.close()

    def abort(self) -> None:
        """Drop a broken or hung connection at once: no goodbye, no waiting."""
        self._fail(TransientError(f"{self.name}: connection dropped"))
        with contextlib.suppress(Exception):
            self._writer.transport.abort()
        self._task.cancel()

    async def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close the socket."""
        if self._broken is None:
            with contextlib.suppress(Exception):
                self._writer.write(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_DISC, 0, 0, 0))
                await asyncio.wait_for(self._writer.drain(), 1.0)
        self._fail(SourceError(f"{self.name}: connection closed"))
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


class _Handshake:
    """The client side of the fixed-newstyle negotiation, one option at a time."""

    def __init__(self, name: str, addr: NbdAddress, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tls: ssl.SSLContext | None) -> None:
        self.name = name
        self.addr = addr
        self.reader = reader
        self.writer = writer
        self.tls = tls

    async def run(self) -> ExportInfo:
        try:
            return await self._negotiate()
        except asyncio.IncompleteReadError as e:
            raise TransientError(f"{self.name}: server closed the connection during the "
                                 "handshake") from e
        except (OSError, ssl.SSLError) as e:
            if isinstance(e, ssl.SSLCertVerificationError):
                raise SourceError(f"{self.name}: TLS: {describe(e)}") from e
            raise TransientError(f"{self.name}: handshake: {describe(e)}") from e

    async def _negotiate(self) -> ExportInfo:
        magic, opt_magic, flags = w.GREETING.unpack(await self.reader.readexactly(18))
        if magic != w.NBDMAGIC:
            raise NbdProtocolError(f"{self.name}: not an NBD server (bad magic)")
        if opt_magic == _OLDSTYLE_MAGIC or not flags & w.FLAG_FIXED_NEWSTYLE:
            raise SourceError(f"{self.name}: server speaks only the old handshake")
        if opt_magic != w.IHAVEOPT:
            raise NbdProtocolError(f"{self.name}: bad handshake magic")
        no_zeroes = bool(flags & w.FLAG_NO_ZEROES)
        self.writer.write(w.CLIENT_FLAGS.pack(
            w.FLAG_C_FIXED_NEWSTYLE | (w.FLAG_C_NO_ZEROES if no_zeroes else 0)))
        if self.addr.tls:
            await self._starttls()
        kind, _ = await self._option(w.OPT_STRUCTURED_REPLY)
        structured = kind == w.REP_ACK
        return await self._go(structured, no_zeroes)

    async def _starttls(self) -> None:
        assert self.tls is not None
        kind, data = await self._option(w.OPT_STARTTLS)
        if kind != w.REP_ACK:
            raise SourceError(f"{self.name}: server refused TLS: {self._why(kind, data)}")
        hostname = self.addr.tls_hostname or self.addr.host or "localhost"
        await self.writer.start_tls(self.tls, server_hostname=hostname)

    async def _go(self, structured: bool, no_zeroes: bool) -> ExportInfo:
        name = self.addr.export.encode()
        payload = (w.U32.pack(len(name)) + name + w.U16.pack(1)
                   + w.U16.pack(w.INFO_BLOCK_SIZE))
        size = flags = -1
        blocks: tuple[int, int, int] = (1, 4096, _DEFAULT_MAX_BLOCK)
        self._send_option(w.OPT_GO, payload)
        while True:
            kind, data = await self._reply(w.OPT_GO)
            if kind == w.REP_ACK:
                break
            if kind == w.REP_INFO and len(data) >= 2:
                info_type = w.U16.unpack_from(data)[0]
                if info_type == w.INFO_EXPORT and len(data) == 12:
                    size, flags = w.INFO_EXPORT_PAYLOAD.unpack(data)[1:]
                elif info_type == w.INFO_BLOCK_SIZE and len(data) == 14:
                    blocks = w.INFO_BLOCK_SIZE_PAYLOAD.unpack(data)[1:]
            elif kind == w.REP_ERR_UNSUP:
                return await self._export_name(structured, no_zeroes)
            elif kind & w.REP_ERR_BIT:
                raise self._option_error(kind, data)
        if size < 0:
            raise NbdProtocolError(f"{self.name}: NBD_OPT_GO finished without export info")
        return ExportInfo(size, flags, structured, *blocks)

    async def _export_name(self, structured: bool, no_zeroes: bool) -> ExportInfo:
        """Servers without NBD_OPT_GO: the old way, which has no error reply."""
        self._send_option(w.OPT_EXPORT_NAME, self.addr.export.encode())
        size, flags = w.EXPORT_NAME_REPLY.unpack(await self.reader.readexactly(10))
        if not no_zeroes:
            await self.reader.readexactly(124)
        return ExportInfo(size, flags, structured)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(w.OPTION_HEADER.pack(w.IHAVEOPT, option, len(data)) + data)

    async def _option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        self._send_option(option, data)
        return await self._reply(option)

    async def _reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, kind, length = w.OPTION_REPLY.unpack(await self.reader.readexactly(20))
        if magic != w.OPTION_REPLY_MAGIC or echoed != option:
            raise NbdProtocolError(f"{self.name}: bad option reply")
        if length > _MAX_OPTION_REPLY:
            raise NbdProtocolError(f"{self.name}: option reply of {length} bytes")
        return kind, await self.reader.readexactly(length)

    def _why(self, kind: int, data: bytes) -> str:
        text = data.decode("utf-8", "replace").strip()
        return f"reply type 0x{kind:x}" + (f": {text}" if text else "")

    def _option_error(self, kind: int, data: bytes) -> SourceError:
        export = self.addr.export
        if kind == w.REP_ERR_UNKNOWN:
            return SourceError(f"{self.name}: no export named {export!r}")
        if kind == w.REP_ERR_TLS_REQD:
            return SourceError(f"{self.name}: the server requires TLS (use nbds://)")
        if kind == w.REP_ERR_SHUTDOWN:
            return TransientError(f"{self.name}: server is shutting down")
        return SourceError(f"{self.name}: NBD_OPT_GO failed: {self._why(kind, data)}")


# -- the byte source ---------------------------------------------------------

class NbdSource(RemoteSource):
    """A read-only NBD export as a byte source; open with :meth:`open`."""

    kind = "nbd"

    #: Identity samples: this many blocks of this size, evenly spaced.
    SAMPLES = 16
    SAMPLE_SIZE = 4096

    def __init__(self, addr: NbdAddress, options: RemoteOptions, *,
                 tls: ssl.SSLContext | None, connections: int) -> None:
        super().__init__(addr.uri, options)
        self.addr = addr
        self._tls = tls
        self._want_connections = connections
        self._conns: list[NbdConnection | None] = [None]
        self._locks: list[asyncio.Lock] = [asyncio.Lock()]
        self.info: ExportInfo | None = None

    @classmethod
    async def open(cls, uri: str, options: RemoteOptions | None = None, *,
                   connections: int = 4, ca_file: str | None = None,
                   cert_file: str | None = None, key_file: str | None = None,
                   insecure: bool = False, tls_hostname: str | None = None) -> NbdSource:
        """Connect, negotiate, and fingerprint the export.

        ``connections`` is the most connections used when the server allows
        multi-conn; TLS options apply to nbds:// URIs.
        """
        addr = parse_nbd_uri(uri)
        if tls_hostname:
            addr = dataclasses.replace(addr, tls_hostname=tls_hostname)
        tls = tls_context(addr, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                          insecure=insecure) if addr.tls else None
        src = cls(addr, options or RemoteOptions(), tls=tls, connections=int(connections))
        try:
            await src._connect_slot(0)
            await src._add_connections()
            src._identity = await src.current_identity()
        except BaseException:
            await src.close()
            raise
        return src

    async def _add_connections(self) -> None:
        """Grow to the wanted number of connections if the server allows it.

        One try each: a server may accept fewer clients than it advertises
        (qemu-nbd --shared), and then the pool is just smaller.
        """
        assert self.info is not None
        n = min(self._want_connections, self.options.concurrency)
        if not self.info.multi_conn or n <= 1:
            return

        async def one() -> NbdConnection:
            async with asyncio.timeout(self.options.connect_timeout):
                return await NbdConnection.connect(self.addr, tls=self._tls, name=self.name)

        results = await asyncio.gather(*(one() for _ in range(n - 1)), return_exceptions=True)
        for r in results:
            if isinstance(r, NbdConnection):
                self._conns.append(r)
                self._locks.append(asyncio.Lock())
            elif not isinstance(r, Exception):
                raise r

    async def _connect_slot(self, slot: int) -> NbdConnection:
        return await self.resilience.call("connect", lambda: self._connection(slot))

    async def _connection(self, slot: int) -> NbdConnection:
        """The connection in ``slot``, (re)opened if missing, broken or stalled."""
        conn = self._conns[slot]
        if conn is not None and not conn.broken and not conn.stalled(self.options.timeout):
            return conn
        async with self._locks[slot]:
            conn = self._conns[slot]
            if conn is not None and not conn.broken and not conn.stalled(self.options.timeout):
                return conn
            if conn is not None:
                self._conns[slot] = None
                conn.abort()
            async with asyncio.timeout(self.options.connect_timeout):
                conn = await NbdConnection.connect(self.addr, tls=self._tls, name=self.name)
            try:
                self._adopt(conn.info)
            except BaseException:
                conn.abort()
                raise
            self._conns[slot] = conn
            return conn

    def _adopt(self, info: ExportInfo) -> None:
        """Take export facts from a fresh connection; a resized export is a new one."""
        if self.info is not None and info.size != self.info.size:
            raise SourceChangedError(f"{self.name}: export size is now {info.size}, "
                                     f"was {self.info.size}")
        self.info = info
        self._size = info.size
        self.max_request = max(min(self.options.max_request, info.max_block), info.min_block)

    def _pick(self) -> int:
        """The slot to use: an empty/broken one to fill, else the least busy.

        A connection that carries a background read (a prefetch's) counts as
        busier than any that carries none: a demand read queues behind
        another reply on its socket, so it goes where no prefetch reply is
        ahead of it whenever such a connection exists (a prefetch keeps at
        most two reads in flight, the pool has up to four connections).
        """
        best, load = 0, (True, 0)
        for i, conn in enumerate(self._conns):
            if conn is None or conn.broken:
                return i
            mine = (conn.background_pending > 0, conn.pending)
            if i == 0 or mine < load:
                best, load = i, mine
        return best

    async def _fetch(self, offset: int, length: int) -> bytes:
        assert self.info is not None
        # Honour the server's minimum block size: widen to it, then cut back.
        mb = self.info.min_block
        start = offset - offset % mb
        end = min(-(-(offset + length) // mb) * mb, self._size)
        conn = await self._connection(self._pick())
        data = await conn.pread(start, end - start)
        if start != offset or end != offset + length:
            data = data[offset - start: offset - start + length]
        return check_body(self.name, f"read {offset}+{length}", data, length)

    async def current_identity(self) -> dict[str, Any]:
        """Size plus a hash of sampled blocks: NBD has no ETag."""
        size = self._size
        step = max(size // self.SAMPLES, 1)
        offsets = sorted({min(off, max(size - self.SAMPLE_SIZE, 0))
                          for off in range(0, size, step)})
        blocks = await gather_all([self.pread(off, self.SAMPLE_SIZE) for off in offsets])
        h = hashlib.sha256(str(size).encode())
        for off, block in zip(offsets, blocks, strict=True):
            h.update(w.U64.pack(off) + block)
        return {"kind": "nbd", "uri": self.addr.uri, "export": self.addr.export, "size": size,
                "sample_sha256": h.hexdigest(), "samples": len(offsets),
                "sample_size": self.SAMPLE_SIZE}

    def connection_count(self) -> int:
        return sum(1 for c in self._conns if c is not None and not c.broken)

    def stats(self) -> dict[str, int | float]:
        out = super().stats()
        out["connections"] = self.connection_count()
        return out

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            conns, self._conns = self._conns, [None] * len(self._conns)
            await asyncio.gather(*(c.close() for c in conns if c is not None),
                                 return_exceptions=True)
