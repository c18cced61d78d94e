"""HTTP(S) byte source: an object read by Range requests over pooled connections.

The object's size and version (ETag, Last-Modified) are taken once, at open,
from HEAD (or from the Content-Range of a one-byte GET when HEAD is refused
or has no length). Every ranged GET then carries If-Match (strong ETag) or
If-Unmodified-Since, so a changed object fails loudly with
SourceChangedError instead of mixing two versions' bytes in one cache.

A reply must be exactly the requested range: a 206 whose Content-Range or
body length disagrees, or a body cut short, is a (retried) failure, never
partial data. A server that ignores Range and answers 200 with the whole
object is accepted only when the whole object was asked for, and refused
with a clear message otherwise: streaming whole images to read 64 KiB is
not a fallback worth having.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import hdrs
from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
from yarl import URL

from bootcache.errors import SourceError
from bootcache.sources.resilience import (
    RemoteOptions,
    RemoteSource,
    SourceChangedError,
    TransientError,
    check_body,
    describe,
)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CONTENT_RANGE_UNSAT = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
# Worth retrying: the server or something in front of it is overloaded or
# restarting (408 request timeout, 425 too early, 429 throttled, 5xx).
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_USER_AGENT = "bootcache/0.1"


def _ssl_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext | bool:
    if insecure:
        return False
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return True


def _check_status(name: str, what: str, status: int, reason: str | None) -> None:
    """Raise for any status other than the expected success codes."""
    if status in (200, 206):
        return
    text = f"{name}: {what}: HTTP {status} {reason or ''}".rstrip()
    if status == 412:
        raise SourceChangedError(f"{text}: the object changed since it was opened")
    if status in _TRANSIENT_STATUS or status >= 500:
        raise TransientError(text)
    raise SourceError(text)


def _environment(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None,
                                    aiohttp.BasicAuth | None]:
    """Proxy, proxy credentials and ~/.netrc credentials for ``url``, from the
    environment (HTTP(S)_PROXY, NO_PROXY, NETRC), as aiohttp's trust_env reads them."""
    target = URL(url)
    try:
        proxy, proxy_auth = get_env_proxy_for_url(target)
    except LookupError:
        proxy, proxy_auth = None, None
    netrc = netrc_from_env()
    auth = None
    if netrc is not None and target.host is not None:
        try:
            auth = basicauth_from_netrc(netrc, target.host)
        except LookupError:
            auth = None
    return proxy, proxy_auth, auth


def _translate(name: str, what: str, e: aiohttp.ClientError) -> SourceError:
    """Map an aiohttp failure to transient (retry) or permanent."""
    if isinstance(e, aiohttp.ClientSSLError | aiohttp.InvalidURL | aiohttp.TooManyRedirects):
        return SourceError(f"{name}: {what}: {describe(e)}")
    return TransientError(f"{name}: {what}: {describe(e)}")


class HttpSource(RemoteSource):
    """A read-only HTTP(S) object; open with :meth:`open`."""

    kind = "http"
    probe_name = "HEAD"
    # A HEAD request is cheap: warm caches ask it every few seconds.
    version_check_interval = 5.0

    def __init__(self, url: str, session: aiohttp.ClientSession, options: RemoteOptions,
                 *, if_match: bool = True, proxy: URL | None = None,
                 proxy_auth: aiohttp.BasicAuth | None = None) -> None:
        super().__init__(url, options)
        self.url = url
        self._session = session
        self._if_match = if_match
        self._conditions: dict[str, str] = {}
        self._proxy = proxy
        self._proxy_auth = proxy_auth

    @classmethod
    async def open(cls, url: str, options: RemoteOptions | None = None, *,
                   headers: Mapping[str, str] | None = None, ca_file: str | None = None,
                   insecure: bool = False, trust_env: bool = True,
                   if_match: bool = True) -> HttpSource:
        """Connect, learn size and version, and return the source.

        ``headers`` are sent with every request (e.g. Authorization);
        ``ca_file`` adds a CA bundle for https, ``insecure`` skips verification;
        ``trust_env`` honours HTTP(S)_PROXY / NO_PROXY and ~/.netrc;
        ``if_match`` makes every read conditional on the version seen at open.
        """
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{url}: not an http(s) URL")
        opts = options or RemoteOptions()
        connector = aiohttp.TCPConnector(
            limit=opts.concurrency, limit_per_host=opts.concurrency,
            ssl=_ssl_context(ca_file, insecure), ttl_dns_cache=60)
        base_headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        base_headers.update(headers or {})
        proxy = proxy_auth = None
        if trust_env:
            # Read once here: aiohttp's own trust_env re-reads the environment
            # and ~/.netrc in a worker thread on every request, which cost
            # more CPU than the request itself on a fast link.
            proxy, proxy_auth, netrc_auth = await asyncio.to_thread(_environment, url)
            if netrc_auth is not None and not any(
                    k.lower() == hdrs.AUTHORIZATION.lower() for k in base_headers):
                base_headers[hdrs.AUTHORIZATION] = netrc_auth.encode()
        session = aiohttp.ClientSession(
            connector=connector, headers=base_headers, trust_env=False,
            auto_decompress=False,
            # The per-attempt limit is enforced around each request; these
            # make a silent peer fail early rather than at that limit.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=opts.connect_timeout,
                                          sock_read=opts.timeout))
        src = cls(url, session, opts, if_match=if_match, proxy=proxy, proxy_auth=proxy_auth)
        await src._learn_version(session.close)
        return src

    def _set_identity(self, ident: dict[str, Any]) -> None:
        super()._set_identity(ident)
        self._conditions = {}
        etag = ident.get("etag")
        if not self._if_match:
            return
        if etag and not etag.startswith("W/"):
            self._conditions["If-Match"] = etag
        elif ident.get("last_modified"):
            # Weak ETags cannot be used with If-Match; a date still catches most changes.
            self._conditions["If-Unmodified-Since"] = ident["last_modified"]

    async def _probe(self) -> dict[str, Any]:
        """One attempt at learning size, ETag and Last-Modified."""
        try:
            async with self._session.head(self.url, allow_redirects=True, proxy=self._proxy,
                                          proxy_auth=self._proxy_auth) as r:
                length = r.headers.get("Content-Length")
                if r.status == 200 and length is not None and length.isdigit():
                    return self._make_identity(int(length), r.headers)
                if r.status not in (200, 403, 405, 501):
                    _check_status(self.name, "HEAD", r.status, r.reason)
            # HEAD refused or without a length: a one-byte GET tells the size.
            async with self._session.get(self.url, headers={"Range": "bytes=0-0"},
                                         allow_redirects=True, proxy=self._proxy,
                                         proxy_auth=self._proxy_auth) as r:
                if r.status == 416:
                    m = _CONTENT_RANGE_UNSAT.match(r.headers.get("Content-Range", ""))
                    if m:
                        return self._make_identity(int(m.group(1)), r.headers)
                _check_status(self.name, "GET bytes=0-0", r.status, r.reason)
                if r.status == 206:
                    m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
                    if not m or m.group(3) == "*":
                        raise SourceError(f"{self.name}: cannot tell the object's size "
                                          f"(Content-Range {r.headers.get('Content-Range')!r})")
                    return self._make_identity(int(m.group(3)), r.headers)
                if r.content_length is None:
                    raise SourceError(f"{self.name}: cannot tell the object's size "
                                      "(no Content-Length, no Range support)")
                return self._make_identity(r.content_length, r.headers)
        except aiohttp.ClientError as e:
            raise _translate(self.name, "HEAD", e) from e

    def _make_identity(self, size: int, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"kind": "http", "url": self.url, "size": size,
                "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}

    async def _fetch(self, offset: int, length: int) -> bytes:
        end = offset + length - 1
        what = f"GET bytes={offset}-{end}"
        headers = {"Range": f"bytes={offset}-{end}", **self._conditions}
        try:
            async with self._session.get(self.url, headers=headers, allow_redirects=True,
                                         proxy=self._proxy, proxy_auth=self._proxy_auth) as r:
                _check_status(self.name, what, r.status, r.reason)
                if r.status == 200:
                    return await self._whole_object(r, what, offset, length)
                self._check_content_range(what, r.headers.get("Content-Range"), offset, end)
                return check_body(self.name, what, await r.read(), length)
        except aiohttp.ClientError as e:
            raise _translate(self.name, what, e) from e

    async def _whole_object(self, r: aiohttp.ClientResponse, what: str,
                            offset: int, length: int) -> bytes:
        """A 200 reply: the server ignored Range and sends the whole object."""
        if offset != 0 or length != self._size:
            r.close()  # do not drain a whole image through the pool
            raise SourceError(
                f"{self.name}: {what}: the server ignores Range requests (HTTP 200 with the "
                "whole object); bootcache needs byte-range support on HTTP bases")
        return check_body(self.name, what, await r.read(), length)

    def _check_content_range(self, what: str, header: str | None, start: int, end: int) -> None:
        m = _CONTENT_RANGE.match(header or "")
        if not m:
            raise TransientError(f"{self.name}: {what}: bad Content-Range {header!r}")
        if m.group(3) != "*" and int(m.group(3)) != self._size:
            raise SourceChangedError(
                f"{self.name}: {what}: object size is now {m.group(3)}, was {self._size}")
        if (int(m.group(1)), int(m.group(2))) != (start, end):
            raise TransientError(f"{self.name}: {what}: server sent range {header!r}")

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._session.close()
