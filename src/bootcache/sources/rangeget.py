"""Ranged GETs over pooled keep-alive HTTP/1.1 connections: the data path of
HTTP and S3 sources.

A general HTTP client spends far more CPU per request than a cache miss
can afford (aiohttp: about 0.4 ms per 64 KiB GET on the machine of
BENCHMARKS.md, several times the rest of the miss). This client does only
what a ranged read needs: one request line and a few fixed headers out, a
status line, headers and a Content-Length body in, straight into one buffer.

Anything else (a redirect, a chunked or length-less body, an interim 1xx
reply) raises :class:`NotSimple`: the caller falls back to its general client
for that object. Connection failures raise OSError (ConnectionError,
IncompleteRead as ConnectionResetError), which callers treat as transient.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import cast

from yarl import URL

_MAX_HEAD = 64 << 10
_MAX_IDLE = 64


class NotSimple(Exception):
    """The server answered in a way this client leaves to a general one."""


class Reply:
    """A complete reply: status, lower-cased headers, body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.head = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: bytearray | None = None
        self.filled = 0
        self.closed = False
        self.keep_alive = True
        self.limit = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, request: bytes, waiter: asyncio.Future[Reply], limit: int) -> None:
        assert self.transport is not None
        self.waiter = waiter
        self.limit = limit
        self.head.clear()
        self.body = None
        self.filled = 0
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._fail(ConnectionResetError("data from the server out of turn"))
            return
        if self.body is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > _MAX_HEAD:
                    self._fail(ConnectionResetError("reply headers too long"))
                return
            try:
                self._parse_head(bytes(self.head[:end]))
            except NotSimple as e:
                self.keep_alive = False
                self.waiter.set_exception(e)
                self.close()
                return
            data = bytes(self.head[end + 4:])
            self.head.clear()
        body = self.body
        assert body is not None
        n = len(data)
        if self.filled + n > len(body):
            self._fail(ConnectionResetError("reply longer than its Content-Length"))
            return
        body[self.filled:self.filled + n] = data
        self.filled += n
        if self.filled == len(body):
            waiter, self.waiter = self.waiter, None
            waiter.set_result(Reply(self.status, self.headers, bytes(body)))
            self.body = None

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise NotSimple(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise NotSimple(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        if self.status < 200 or 300 <= self.status < 400:
            raise NotSimple(f"HTTP {self.status}")
        length = headers.get("content-length")
        if "transfer-encoding" in headers or length is None or not length.isdigit():
            raise NotSimple("a reply without a plain Content-Length")
        if int(length) > self.limit:
            # e.g. a whole image where a range was asked: not read into memory here
            raise NotSimple(f"a body of {length} bytes")
        if parts[0] == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
            self.keep_alive = False
        self.body = bytearray(int(length))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError(
                "the server closed the connection mid-reply" if self.body is not None
                else "the server closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class RangeClient:
    """GETs of byte ranges of one origin, over a pool of keep-alive connections."""

    def __init__(self, url: str, headers: Mapping[str, str], *,
                 ssl_context: ssl.SSLContext | None, connect_timeout: float) -> None:
        u = URL(url)
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError(f"{url}: not an http(s) URL")
        self.host = u.host
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl_context if u.scheme == "https" else None
        if u.scheme == "https" and ssl_context is None:
            self.ssl = ssl.create_default_context()
        host_header = u.raw_host or self.host
        if u.port is not None and not u.is_default_port():
            host_header = f"{host_header}:{u.port}"
        fixed = {"Host": host_header, **headers}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []

    async def get(self, target: str, extra: Mapping[str, str], limit: int) -> Reply:
        """GET ``target`` (path and query) with ``extra`` headers; the whole
        reply, whose body may not be longer than ``limit``."""
        request = (f"GET {target} HTTP/1.1\r\n{self._fixed}"
                   + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                   + "\r\n").encode("latin-1")
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                try:
                    return await self._exchange(conn, request, limit)
                except ConnectionResetError:
                    # An idle connection the server had already closed: a new one.
                    if conn.filled or conn.head:
                        raise
        conn = await self._connect()
        return await self._exchange(conn, request, limit)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl else None)
        return conn

    async def _exchange(self, conn: _Connection, request: bytes, limit: int) -> Reply:
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        conn.send(request, waiter, limit)
        try:
            reply = await waiter
        except BaseException:
            conn.close()  # cancelled or failed mid-reply: never reused
            raise
        if conn.keep_alive and not conn.closed and len(self._idle) < _MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return reply

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
