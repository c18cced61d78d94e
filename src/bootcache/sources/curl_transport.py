"""HTTP requests through libcurl (pycurl): the transport under the HTTP and S3 sources.

One ``CurlMulti`` per source runs every request; libcurl keeps the
connections (keep-alive), and a share handle keeps DNS answers and TLS
sessions across its easy handles. The multi handle is driven by the event
loop itself: libcurl names the sockets to watch and its timer
(``M_SOCKETFUNCTION``, ``M_TIMERFUNCTION``); the sockets go into an epoll
set of the transport's own, which the loop watches as one reader, and
``socket_action`` runs when one is ready (pycurl releases the GIL while
libcurl sends, receives and decrypts). A request is sent from the call
that starts it. A cold miss thus crosses no thread: an earlier version ran
the multi handle in a worker thread, and its two hand-overs per request
(a wake-up each way, and the GIL passed between the threads) cost more
time than the loop saved (BENCHMARKS.md, issue 13).

Only the transport lives here: a request returns the final status, the
headers and at most ``limit`` body bytes (a longer body is cut off and
flagged, never handed over as if complete). What a status or a short body
means (retry, give up, a changed object) is decided by the sources and the
policy in resilience.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import pycurl  # type: ignore[import-untyped]

from bootcache.errors import SourceError
from bootcache.sources.resilience import TransientError

# libcurl errors that another attempt cannot fix: bad URL or protocol, a
# redirect loop, certificates and TLS set-up refused.
_PERMANENT = frozenset({
    pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT, pycurl.E_TOO_MANY_REDIRECTS,
    pycurl.E_SSL_CERTPROBLEM, pycurl.E_SSL_CIPHER, pycurl.E_PEER_FAILED_VERIFICATION,
    pycurl.E_SSL_CACERT_BADFILE, pycurl.E_SSL_ENGINE_NOTFOUND, pycurl.E_SSL_ISSUER_ERROR,
    pycurl.E_SSL_PINNEDPUBKEYNOTMATCH, pycurl.E_SSL_INVALIDCERTSTATUS,
})
# libcurl reads up to this much per receive call: a 64 KiB-1 MiB body then
# reaches Python in one or a few pieces.
_BUFFER_SIZE = 1 << 20


class TransferFailed(Exception):
    """A request that got no complete reply (libcurl's error code and text)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message or f"libcurl error {code}")
        self.code = code
        #: True when retrying cannot help (certificates, malformed URLs).
        self.permanent = code in _PERMANENT

    def as_source_error(self, name: str, what: str) -> SourceError:
        """The failure as the sources' policy classes it: permanent or worth a retry."""
        kind = SourceError if self.permanent else TransientError
        return kind(f"{name}: {what}: {self}")


@dataclass(frozen=True, slots=True)
class Reply:
    """The final response of a request (after redirects)."""

    status: int
    #: The status line's reason phrase ("Not Found"), if any.
    reason: str
    #: Header names in lower case; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes
    #: The body was longer than the request's ``limit`` and was cut off.
    overflow: bool


@dataclass(frozen=True, slots=True)
class CurlSettings:
    """How the transport connects; fixed for the life of a source."""

    connect_timeout: float
    #: One request, whole reply included (the policy's attempt timeout is the
    #: real limit; this is libcurl's own backstop).
    timeout: float
    #: Sent with every request, as "Name: value" lines.
    headers: tuple[str, ...] = ()
    user_agent: str = "bootcache"
    #: None: no proxy (the environment is read by the source, once).
    proxy: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    #: Connections kept open for reuse.
    max_connections: int = 8


def proxy_from_environment(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY and NO_PROXY name for ``url`` now (None: direct)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme)


def _system_ca_paths() -> tuple[str | None, str | None]:
    """The system's CA bundle and directory, as the system OpenSSL finds them
    (the wheel's libcurl looks in another distribution's place)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.openssl_cafile, paths.capath or paths.openssl_capath


class _Exchange:
    """One easy handle, reused request after request, and what it received."""

    __slots__ = ("chunks", "easy", "future", "headers", "limit", "lines", "overflow", "pool",
                 "received", "url")

    def __init__(self, easy: pycurl.Curl) -> None:
        self.easy = easy
        self.lines: list[bytes] = []
        self.chunks: list[bytes] = []
        self.received = 0
        self.limit = 0
        self.overflow = False
        self.future: asyncio.Future[Reply] | None = None
        #: Where a cancelled request's handle goes back once out of the multi.
        self.pool: list[_Exchange] | None = None
        self.url: str | None = None
        self.headers: Sequence[str] | None = None
        easy.setopt(pycurl.WRITEFUNCTION, self.write)
        easy.setopt(pycurl.HEADERFUNCTION, self.lines.append)

    def begin(self, limit: int, future: asyncio.Future[Reply]) -> None:
        self.lines.clear()
        self.chunks = []
        self.received = 0
        self.limit = limit
        self.overflow = False
        self.future = future

    def write(self, chunk: bytes) -> int | None:
        received = self.received + len(chunk)
        if received > self.limit:
            self.overflow = True
            return 0  # more than asked for: stop the transfer here
        self.chunks.append(chunk)
        self.received = received
        return None

    def reply(self) -> Reply:
        status = self.easy.getinfo(pycurl.RESPONSE_CODE)
        # Only the last response counts (not a redirect's nor a 100 Continue's).
        text = b"".join(self.lines).decode("latin-1")
        head = text[text.rfind("\nHTTP/") + 1:].split("\r\n")
        reason = head[0].partition(" ")[2].partition(" ")[2]
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.lower()] = value.strip()
        chunks = self.chunks
        # One piece (the usual case for a cluster) is handed over without a copy.
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Reply(status, reason, headers, body, self.overflow)


class CurlTransport:
    """Runs requests for one source on the event loop that created it.

    Concurrency is bounded by the caller (the source's request slots); the
    transport keeps an easy handle per request in flight and reuses them.
    Every call is made from that loop.
    """

    def __init__(self, settings: CurlSettings) -> None:
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self._share = pycurl.CurlShare()
        self._share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
        self._share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_SSL_SESSION)
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi.setopt(pycurl.M_MAXCONNECTS, settings.max_connections)
        self._ca_file, self._ca_path = _system_ca_paths()
        # Handles not in the multi, ready for a request.
        self._idle: list[_Exchange] = []
        self._idle_head: list[_Exchange] = []
        self._running: dict[pycurl.Curl, _Exchange] = {}
        self._closed = False
        # libcurl's sockets are watched in an epoll set of the transport's own,
        # which the loop watches as one reader. A kept-alive connection stays
        # in the set between requests (libcurl says POLL_REMOVE after each and
        # POLL_IN at the next): one epoll_ctl per request instead of a loop
        # reader added and removed (about 20 system calls in uvloop). A socket
        # libcurl closes leaves the set by itself (the kernel drops it).
        self._epoll = select.epoll()
        #: fd -> the epoll events libcurl wants now; 0: parked (idle, still in the set).
        self._wanted: dict[int, int] = {}
        self._loop.add_reader(self._epoll.fileno(), self._ready)
        self._timer: asyncio.TimerHandle | None = None
        self._starting = False
        #: Connections opened so far (keep-alive keeps this low).
        self.connects = 0

    # -- requests -------------------------------------------------------------

    async def get(self, url: str, *, start: int, end: int, limit: int,
                  headers: Sequence[str] = ()) -> Reply:
        """GET bytes ``start``-``end`` (inclusive); at most ``limit`` body bytes are kept."""
        exchange = self._idle.pop() if self._idle else self._new_exchange()
        return await self._run(exchange, self._idle, url, f"{start}-{end}", limit, headers)

    async def head(self, url: str, headers: Sequence[str] = ()) -> Reply:
        # HEADs have handles of their own (NOBODY stays set on them).
        if self._idle_head:
            exchange = self._idle_head.pop()
        else:
            exchange = self._new_exchange()
            exchange.easy.setopt(pycurl.NOBODY, 1)
        return await self._run(exchange, self._idle_head, url, None, 0, headers)

    async def _run(self, exchange: _Exchange, pool: list[_Exchange], url: str,
                   byte_range: str | None, limit: int, headers: Sequence[str]) -> Reply:
        if self._closed:
            raise TransferFailed(0, "transport is closed")
        easy = exchange.easy
        if url != exchange.url:
            easy.setopt(pycurl.URL, url)
            exchange.url = url
        if headers != exchange.headers:
            easy.setopt(pycurl.HTTPHEADER, [*self.settings.headers, *headers])
            exchange.headers = headers
        if byte_range is None:
            easy.unsetopt(pycurl.RANGE)
        else:
            easy.setopt(pycurl.RANGE, byte_range)
        future: asyncio.Future[Reply] = self._loop.create_future()
        exchange.begin(limit, future)
        self._running[easy] = exchange
        self._starting = True  # the timer libcurl sets now is run right below
        try:
            self._multi.add_handle(easy)
        finally:
            self._starting = False
        try:
            # Start it now (on a kept-alive connection: send the request), not
            # one loop iteration later.
            self._action(pycurl.SOCKET_TIMEOUT, 0)
            return await future
        except BaseException:
            # Cancelled (the attempt timed out): out of the multi at once, which
            # closes its connection if the reply was not complete, so nothing
            # of this transfer can land in the next one's buffers.
            if self._running.pop(easy, None) is not None:
                self._multi.remove_handle(easy)
            raise
        finally:
            exchange.future = None
            if not self._closed:
                pool.append(exchange)

    def _new_exchange(self) -> _Exchange:
        s = self.settings
        easy = pycurl.Curl()
        easy.setopt(pycurl.NOSIGNAL, 1)
        easy.setopt(pycurl.SHARE, self._share)
        easy.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        easy.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        easy.setopt(pycurl.FOLLOWLOCATION, 1)
        easy.setopt(pycurl.MAXREDIRS, 10)
        easy.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        easy.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(s.connect_timeout * 1000)))
        easy.setopt(pycurl.TIMEOUT_MS, max(1, int(s.timeout * 1000)))
        # A peer that stops sending fails the request like a read timeout would.
        easy.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        easy.setopt(pycurl.LOW_SPEED_TIME, max(1, round(s.timeout)))
        easy.setopt(pycurl.TCP_KEEPALIVE, 1)
        easy.setopt(pycurl.BUFFERSIZE, _BUFFER_SIZE)
        easy.setopt(pycurl.USERAGENT, s.user_agent)
        easy.setopt(pycurl.PROXY, s.proxy or "")  # "" also ignores libcurl's own env look-up
        if s.insecure:
            easy.setopt(pycurl.SSL_VERIFYPEER, 0)
            easy.setopt(pycurl.SSL_VERIFYHOST, 0)
        else:
            ca_file = s.ca_file or self._ca_file
            if ca_file:
                easy.setopt(pycurl.CAINFO, ca_file)
            if self._ca_path:
                easy.setopt(pycurl.CAPATH, self._ca_path)
        return _Exchange(easy)

    # -- driving the multi handle from the loop ---------------------------------

    def _action(self, fd: int, events: int) -> None:
        """Let libcurl work on ``fd`` (or its timers), then settle what finished."""
        if self._closed:
            return
        self._multi.socket_action(fd, events)
        self._settle()

    def _settle(self) -> None:
        """Hand over the replies of the requests libcurl finished."""
        multi = self._multi
        while True:
            queued, ok, failed = multi.info_read()
            for easy in ok:
                self._finish(easy, None)
            for easy, code, message in failed:
                self._finish(easy, (code, message))
            if not queued:
                break

    def _finish(self, easy: pycurl.Curl, error: tuple[int, str] | None) -> None:
        exchange = self._running.pop(easy, None)
        self.connects += easy.getinfo(pycurl.NUM_CONNECTS)
        self._multi.remove_handle(easy)
        if exchange is None:
            return
        future = exchange.future
        if future is None or future.done():
            return
        if error is not None and not (error[0] == pycurl.E_WRITE_ERROR and exchange.overflow):
            future.set_exception(TransferFailed(*error))
        else:
            future.set_result(exchange.reply())

    def _ready(self) -> None:
        """Some of libcurl's sockets are ready: let it work on each, then
        settle what finished."""
        if self._closed:
            return
        multi = self._multi
        wanted = self._wanted
        for fd, events in self._epoll.poll(0):
            if not wanted.get(fd):
                # A parked connection woke up: the server closed it (or sent
                # something unasked). libcurl finds out when it next uses it.
                wanted.pop(fd, None)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
                continue
            flags = ((pycurl.CSELECT_IN if events & select.EPOLLIN else 0)
                     | (pycurl.CSELECT_OUT if events & select.EPOLLOUT else 0)
                     | (pycurl.CSELECT_ERR if events & (select.EPOLLERR | select.EPOLLHUP) else 0))
            multi.socket_action(fd, flags)
        self._settle()

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        wanted = self._wanted
        if what == pycurl.POLL_REMOVE:
            if fd in wanted:
                wanted[fd] = 0  # parked: left in the set, see __init__
            return
        events = ((select.EPOLLIN if what & pycurl.POLL_IN else 0)
                  | (select.EPOLLOUT if what & pycurl.POLL_OUT else 0))
        if wanted.get(fd) == events:
            return  # watched already: libcurl says POLL_REMOVE before it closes one
        wanted[fd] = events
        try:
            self._epoll.modify(fd, events)
        except FileNotFoundError:  # new, or closed since it was parked (and reused)
            self._epoll.register(fd, events)

    def _on_timer(self, timeout_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms >= 0 and not self._starting:
            # Never call back into libcurl from inside its own callback.
            self._timer = self._loop.call_later(
                timeout_ms / 1000, self._action, pycurl.SOCKET_TIMEOUT, 0)

    # -- closing ------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        failure = TransferFailed(0, "transport closed")
        for easy, exchange in list(self._running.items()):
            self._multi.remove_handle(easy)
            if exchange.future is not None and not exchange.future.done():
                exchange.future.set_exception(failure)
        exchanges = [*self._running.values(), *self._idle, *self._idle_head]
        self._running.clear()
        self._multi.close()  # closes the kept connections
        for exchange in exchanges:
            exchange.easy.close()
        self._idle.clear()
        self._idle_head.clear()
        self._share.close()
        with contextlib.suppress(RuntimeError):  # the loop closed first
            self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._wanted.clear()
