"""HTTP requests through libcurl (pycurl): the transport under the HTTP and S3 sources.

One ``CurlMulti`` per source runs every request; libcurl keeps the
connections (keep-alive), and a share handle keeps DNS answers and TLS
sessions across its easy handles. The multi handle lives in a worker
thread of its own, which waits on the sockets libcurl names
(``M_SOCKETFUNCTION``, ``M_TIMERFUNCTION``) and runs ``socket_action``
(pycurl releases the GIL while libcurl sends, receives and decrypts); the
event loop only prepares a request, hands it over and gets the reply back
(``call_soon_threadsafe``, several replies per wake-up when they finish
together). Measured against driving the multi handle from the loop's own
readers and timers (BENCHMARKS.md, issue 13), this halves the loop's CPU
per cold miss for about the same total, and the loop is what serves every
VM of a node.

Only the transport lives here: a request returns the final status, the
headers and at most ``limit`` body bytes (a longer body is cut off and
flagged, never handed over as if complete). What a status or a short body
means (retry, give up, a changed object) is decided by the sources and the
policy in resilience.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pycurl  # type: ignore[import-untyped]

from bootcache.errors import SourceError
from bootcache.sources.resilience import TransientError

log = logging.getLogger(__name__)

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


class _LoopGone(Exception):
    """The event loop a transport answers to has closed."""


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
    """Runs requests for one source in a worker thread of its own.

    Concurrency is bounded by the caller (the source's request slots); the
    transport keeps an easy handle per request in flight and reuses them.
    Every call is made from the event loop that created the transport.
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
        # The loop's side: handles not in the multi, ready for a request.
        self._idle: list[_Exchange] = []
        self._idle_head: list[_Exchange] = []
        self._closed = False  # no new requests
        self._shut = False  # close() has run
        # Handed to the worker: ("add" | "remove", exchange) or ("stop", None).
        self._inbox: collections.deque[tuple[str, _Exchange | None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The worker's side (only the worker touches these).
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running: dict[pycurl.Curl, _Exchange] = {}
        self._watched: dict[int, int] = {}  # fd -> selectors events
        self._deadline: float | None = None  # libcurl's timer, time.monotonic()
        self._asleep = False
        #: Connections opened so far (keep-alive keeps this low).
        self.connects = 0
        self._thread = threading.Thread(target=self._serve, name="bootcache-curl", daemon=True)
        self._thread.start()

    # -- requests (event loop) ------------------------------------------------

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
        easy = exchange.easy  # not in the multi: the loop may set its options
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
        self._post("add", exchange)
        try:
            reply = await future
        except TransferFailed:
            pool.append(exchange)  # the worker took it out of the multi first
            raise
        except BaseException:
            # Cancelled (the attempt timed out): the worker takes the handle out
            # of the multi (closing its connection), and only then is it reused,
            # so nothing of this transfer can land in the next one's buffers.
            exchange.future = None
            exchange.pool = pool
            self._post("remove", exchange)
            raise
        pool.append(exchange)
        return reply

    def _post(self, what: str, exchange: _Exchange | None) -> None:
        self._inbox.append((what, exchange))
        if self._asleep:
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:
                pass  # full of wake-ups already

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

    def _deliver(self, done: list[tuple[_Exchange, Reply | TransferFailed]]) -> None:
        """Replies from the worker, on the loop."""
        for exchange, outcome in done:
            future = exchange.future
            if future is None or future.done():
                continue
            if isinstance(outcome, TransferFailed):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _released(self, exchange: _Exchange) -> None:
        """A cancelled request's handle is out of the multi: reusable."""
        if not self._closed and exchange.pool is not None:
            exchange.pool.append(exchange)
        exchange.pool = None

    # -- the worker thread ------------------------------------------------------

    def _serve(self) -> None:
        try:
            while self._serve_once():
                pass
        except _LoopGone:
            self._closed = True  # nobody left to answer (the loop closed first)
        except BaseException as e:  # a bug here must not leave readers waiting forever
            log.exception("libcurl worker failed")
            failure = TransferFailed(0, f"libcurl worker failed: {e!r}")
            done: list[tuple[_Exchange, Reply | TransferFailed]] = [
                (x, failure) for x in self._running.values()]
            self._closed = True
            if done:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._deliver, done)

    def _to_loop(self, callback: Callable[[Any], None], arg: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError as e:  # the loop is closed: a source that was never closed
            raise _LoopGone from e

    def _serve_once(self) -> bool:
        """Wait for sockets, the timer or the loop; run libcurl; hand back replies."""
        multi = self._multi
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self._asleep = True
        if self._inbox:
            timeout = 0.0
        events = self._selector.select(timeout)
        self._asleep = False
        for key, mask in events:
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            flags = ((pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0)
                     | (pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0))
            multi.socket_action(key.data, flags)
        started = False
        while self._inbox:
            what, exchange = self._inbox.popleft()
            if what == "stop":
                return False
            assert exchange is not None
            if what == "add":
                self._running[exchange.easy] = exchange
                multi.add_handle(exchange.easy)
                started = True
            elif self._running.pop(exchange.easy, None) is not None:
                multi.remove_handle(exchange.easy)
                self._to_loop(self._released, exchange)
            else:  # finished meanwhile; its reply was dropped
                self._to_loop(self._released, exchange)
        if started or (self._deadline is not None and time.monotonic() >= self._deadline):
            self._deadline = None
            multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        done: list[tuple[_Exchange, Reply | TransferFailed]] = []
        while True:
            queued, ok, failed = multi.info_read()
            for easy in ok:
                self._finish(easy, None, done)
            for easy, code, message in failed:
                self._finish(easy, (code, message), done)
            if not queued:
                break
        if done:
            self._to_loop(self._deliver, done)
        return True

    def _finish(self, easy: pycurl.Curl, error: tuple[int, str] | None,
                done: list[tuple[_Exchange, Reply | TransferFailed]]) -> None:
        exchange = self._running.pop(easy, None)
        self.connects += easy.getinfo(pycurl.NUM_CONNECTS)
        if exchange is not None:
            outcome: Reply | TransferFailed
            if error is not None and not (error[0] == pycurl.E_WRITE_ERROR
                                          and exchange.overflow):
                outcome = TransferFailed(*error)
            else:
                outcome = exchange.reply()  # parsed here, off the loop
            done.append((exchange, outcome))
        self._multi.remove_handle(easy)

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        if what == pycurl.POLL_REMOVE:
            if self._watched.pop(fd, None) is not None:
                self._selector.unregister(fd)
            return
        events = ((selectors.EVENT_READ if what & pycurl.POLL_IN else 0)
                  | (selectors.EVENT_WRITE if what & pycurl.POLL_OUT else 0))
        if fd in self._watched:
            if self._watched[fd] != events:
                self._selector.modify(fd, events, fd)
        else:
            self._selector.register(fd, events, fd)
        self._watched[fd] = events

    def _on_timer(self, timeout_ms: int) -> None:
        # Run by the worker at its next turn, never from inside libcurl's callback.
        self._deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    # -- closing (event loop) -----------------------------------------------------

    async def close(self) -> None:
        if self._shut:
            return
        self._shut = self._closed = True
        if self._thread.is_alive():
            self._post("stop", None)
            self._wake_w.send(b"\0")
            await asyncio.to_thread(self._thread.join)
        failure = TransferFailed(0, "transport closed")
        for exchange in self._running.values():
            self._multi.remove_handle(exchange.easy)
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
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
