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

Requests go through libcurl (sources/curl_transport.py); the environment
(proxy variables, ~/.netrc) is read once, at open.
"""

from __future__ import annotations

import asyncio
import base64
import netrc
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from bootcache.errors import SourceError
from bootcache.sources.curl_transport import (
    CurlSettings,
    CurlTransport,
    TransferFailed,
    proxy_from_environment,
)
from bootcache.sources.resilience import (
    RemoteOptions,
    RemoteSource,
    check_ranged_reply,
    check_status,
    content_range_total,
)

_USER_AGENT = "bootcache/0.1"


def _environment(url: str) -> tuple[str | None, str | None]:
    """The proxy for ``url`` (HTTP(S)_PROXY, NO_PROXY) and an Authorization
    value from ~/.netrc (or $NETRC), as the environment says now."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = proxy_from_environment(url)
    auth = None
    if parts.username is None:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            entry = None
        if entry is not None:
            login, _, password = entry
            token = base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")
            auth = f"Basic {token}"
    return proxy, auth


class HttpSource(RemoteSource):
    """A read-only HTTP(S) object; open with :meth:`open`."""

    kind = "http"
    probe_name = "HEAD"
    # A HEAD request is cheap: warm caches ask it every few seconds.
    version_check_interval = 5.0

    def __init__(self, url: str, transport: CurlTransport, options: RemoteOptions,
                 *, if_match: bool = True) -> None:
        super().__init__(url, options)
        self.url = url
        self._transport = transport
        self._if_match = if_match
        self._conditions: tuple[str, ...] = ()

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
        lines = {"accept-encoding": "Accept-Encoding: identity"}
        for name, value in (headers or {}).items():
            lines[name.lower()] = f"{name}: {value}"
        proxy = None
        if trust_env:
            # Read once here, not per request (it parses files).
            proxy, netrc_auth = await asyncio.to_thread(_environment, url)
            if netrc_auth is not None:
                lines.setdefault("authorization", f"Authorization: {netrc_auth}")
        transport = CurlTransport(CurlSettings(
            connect_timeout=opts.connect_timeout, timeout=opts.timeout,
            headers=tuple(lines.values()), user_agent=_USER_AGENT, proxy=proxy,
            ca_file=ca_file, insecure=insecure, max_connections=opts.concurrency))
        src = cls(url, transport, opts, if_match=if_match)
        await src._learn_version(transport.close)
        return src

    def _set_identity(self, ident: dict[str, Any]) -> None:
        super()._set_identity(ident)
        self._conditions = ()
        etag = ident.get("etag")
        if not self._if_match:
            return
        if etag and not etag.startswith("W/"):
            self._conditions = (f"If-Match: {etag}",)
        elif ident.get("last_modified"):
            # Weak ETags cannot be used with If-Match; a date still catches most changes.
            self._conditions = (f"If-Unmodified-Since: {ident['last_modified']}",)

    async def _probe(self) -> dict[str, Any]:
        """One attempt at learning size, ETag and Last-Modified."""
        what = "HEAD"
        try:
            r = await self._transport.head(self.url)
            length = r.headers.get("content-length")
            if r.status == 200 and length is not None and length.isdigit():
                return self._make_identity(int(length), r.headers)
            if r.status not in (200, 403, 405, 501):
                check_status(self.name, what, r.status, r.reason)
            # HEAD refused or without a length: a one-byte GET tells the size.
            what = "GET bytes=0-0"
            r = await self._transport.get(self.url, start=0, end=0, limit=1)
        except TransferFailed as e:
            raise e.as_source_error(self.name, what) from e
        content_range = r.headers.get("content-range", "")
        if r.status == 416 and content_range.replace(" ", "").startswith("bytes*/"):
            total = content_range.partition("/")[2].strip()
            if total.isdigit():
                return self._make_identity(int(total), r.headers)
        check_status(self.name, what, r.status, r.reason)
        if r.status == 206:
            size = content_range_total(content_range)
            if size is None:
                raise SourceError(f"{self.name}: cannot tell the object's size "
                                  f"(Content-Range {content_range!r})")
            return self._make_identity(size, r.headers)
        length = r.headers.get("content-length")
        if length is None or not length.isdigit():
            raise SourceError(f"{self.name}: cannot tell the object's size "
                              "(no Content-Length, no Range support)")
        return self._make_identity(int(length), r.headers)

    def _make_identity(self, size: int, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"kind": "http", "url": self.url, "size": size,
                "etag": headers.get("etag"), "last_modified": headers.get("last-modified")}

    async def _fetch(self, offset: int, length: int) -> bytes:
        end = offset + length - 1
        what = f"GET bytes={offset}-{end}"
        try:
            r = await self._transport.get(self.url, start=offset, end=end, limit=length,
                                          headers=self._conditions)
        except TransferFailed as e:
            raise e.as_source_error(self.name, what) from e
        check_status(self.name, what, r.status, r.reason)
        return check_ranged_reply(self.name, what, r.status, r.headers.get("content-range"),
                                  r.body, r.overflow, offset, length, self._size)

    def stats(self) -> dict[str, int | float]:
        return {**super().stats(), "connections_opened": self._transport.connects}

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport.close()
