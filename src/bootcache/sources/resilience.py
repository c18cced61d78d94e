"""What every remote byte source shares: options, retries, limits, counters.

A remote read is one *call* made of one or more *attempts*. Each attempt has
its own timeout; a transient failure (refused or reset connection, 5xx,
timeout, truncated body) is retried with capped exponential backoff and full
jitter; the whole call has a deadline, so a base that stays down turns into a
:class:`SourceError` after at most ``deadline`` seconds instead of a hang.
Nothing is remembered between calls: once the base is back, the next attempt
simply succeeds, which is the whole recovery story.

Sources translate their library's exceptions into :class:`TransientError`
(worth retrying) or a plain :class:`SourceError` (retrying cannot help: 404,
403, a server that ignores ranges). The helpers here never see a library type.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from bootcache.errors import SourceError, StaleBaseError
from bootcache.sources.base import ByteSource

T = TypeVar("T")


class TransientError(SourceError):
    """A failure that may go away on its own; the call is retried."""


class SourceChangedError(SourceError, StaleBaseError):
    """The remote object changed since the source was opened (ETag mismatch).

    It is both a source failure (the read did not happen) and a stale-base
    signal, so callers catching either see it. Never retried.
    """


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Knobs shared by all remote sources; every value is in seconds or a count."""

    #: Limit for one attempt (connect + send + the whole reply body).
    timeout: float = 15.0
    #: Limit for establishing a connection, inside ``timeout``.
    connect_timeout: float = 5.0
    #: Limit for a whole call including retries and backoff: the longest a
    #: caller waits before it gets a SourceError from a base that is down.
    deadline: float = 30.0
    #: Retries after the first attempt, within ``deadline``. Enough that the
    #: deadline, not the count, decides how long an outage is waited out.
    retries: int = 64
    #: First backoff delay; doubles per retry up to ``backoff_max``.
    backoff: float = 0.05
    backoff_max: float = 2.0
    #: Requests in flight at once per source (also the connection pool size).
    concurrency: int = 8
    #: Larger reads are split into requests of at most this many bytes, sent
    #: in parallel (bounded by ``concurrency``): one slow stream is not the limit.
    max_request: int = 4 << 20

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> RemoteOptions:
        """Build from user options (strings allowed), checking each key, then the set."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in known:
                raise ValueError(f"unknown source option {key!r}")
            kind = int if known[key] in ("int", int) else float
            try:
                values[key] = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(f"source option {key}={raw!r}: not a number") from None
        # Defaults that follow an explicit timeout, so "timeout=1" alone is valid.
        if "timeout" in values:
            base = cls()
            values.setdefault("connect_timeout", min(base.connect_timeout, values["timeout"]))
            values.setdefault("deadline", max(base.deadline, values["timeout"]))
        return cls(**values).checked()

    def checked(self) -> RemoteOptions:
        """Raise ValueError unless each value and their combination make sense."""
        for name in ("timeout", "connect_timeout", "deadline", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"source option {name} must be > 0")
        if self.backoff < 0 or self.retries < 0:
            raise ValueError("source options backoff and retries must be >= 0")
        if self.concurrency < 1 or self.max_request < 4096:
            raise ValueError("source options: concurrency must be >= 1, max_request >= 4096")
        if self.connect_timeout > self.timeout:
            raise ValueError("source option connect_timeout must not exceed timeout")
        if self.timeout > self.deadline:
            raise ValueError("source option timeout must not exceed deadline")
        return self

    def with_overrides(self, **changes: Any) -> RemoteOptions:
        return replace(self, **changes).checked()


#: Option names consumed by RemoteOptions (the rest belong to the source).
REMOTE_OPTION_KEYS = frozenset(f.name for f in fields(RemoteOptions))


def split_options(options: Mapping[str, Any]) -> tuple[RemoteOptions, dict[str, Any]]:
    """Separate the shared resilience options from source-specific ones."""
    shared = {k: v for k, v in options.items() if k in REMOTE_OPTION_KEYS}
    rest = {k: v for k, v in options.items() if k not in REMOTE_OPTION_KEYS}
    return RemoteOptions.from_mapping(shared), rest


class SourceStats:
    """Counters for one source; cheap enough to update on every request."""

    __slots__ = ("bytes", "errors", "failures", "in_flight", "latency_max", "latency_total",
                 "requests", "retries")

    def __init__(self) -> None:
        self.requests = 0        # attempts sent to the server
        self.bytes = 0           # payload bytes delivered to callers
        self.errors = 0          # attempts that failed (transient or not)
        self.retries = 0         # attempts that were a retry of a failed one
        self.failures = 0        # calls that ended in an exception for the caller
        self.latency_total = 0.0  # seconds spent in attempts, summed
        self.latency_max = 0.0
        self.in_flight = 0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "errors": self.errors,
            "retries": self.retries,
            "failures": self.failures,
            "latency_total_s": round(self.latency_total, 6),
            "latency_max_s": round(self.latency_max, 6),
            "latency_avg_s": round(self.latency_total / self.requests, 6)
            if self.requests else 0.0,
            "in_flight": self.in_flight,
        }


class Resilience:
    """Runs a source's requests under its timeouts, retries, limit and counters."""

    def __init__(self, name: str, options: RemoteOptions) -> None:
        self.name = name
        self.options = options
        self.stats = SourceStats()
        self._slots = asyncio.Semaphore(options.concurrency)

    def backoff_delay(self, retry: int) -> float:
        """Full-jitter exponential backoff: spreads many clients' retries apart."""
        cap = min(self.options.backoff_max, self.options.backoff * (2 ** retry))
        return random.uniform(cap / 2, cap)

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]],
                   *, size_of: Callable[[T], int] = lambda _: 0) -> T:
        """Run ``attempt`` until it succeeds, fails permanently, or time runs out.

        ``what`` names the request in error messages; ``size_of`` tells how
        many payload bytes a result carries, for the byte counter.
        """
        opts = self.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.deadline
        last: BaseException | None = None
        tries = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or tries > opts.retries:
                break
            if tries:
                self.stats.retries += 1
            tries += 1
            try:
                # Waiting for a slot counts against the deadline, so a queue
                # behind a dead server cannot outlive it either.
                async with asyncio.timeout(remaining):
                    await self._slots.acquire()
            except TimeoutError:
                last = TimeoutError("waiting for a free request slot")
                break
            start = time.monotonic()
            self.stats.requests += 1
            self.stats.in_flight += 1
            try:
                async with asyncio.timeout(min(opts.timeout, deadline - loop.time())):
                    result = await attempt()
            except (TransientError, TimeoutError, OSError) as e:
                self.stats.errors += 1
                last = e
            except BaseException as e:
                # Permanent errors and cancellation end the call at once.
                if not isinstance(e, asyncio.CancelledError):
                    self.stats.errors += 1
                    self.stats.failures += 1
                raise
            else:
                self.stats.bytes += size_of(result)
                return result
            finally:
                elapsed = time.monotonic() - start
                self.stats.latency_total += elapsed
                self.stats.latency_max = max(self.stats.latency_max, elapsed)
                self.stats.in_flight -= 1
                self._slots.release()
            delay = self.backoff_delay(tries - 1)
            if tries > opts.retries or delay >= deadline - loop.time():
                break  # no attempt could start in time: fail now, not at the deadline
            await asyncio.sleep(delay)
        self.stats.failures += 1
        spent = opts.deadline - max(deadline - loop.time(), 0.0)
        reason = describe(last) if last is not None else "deadline reached"
        reason = reason.removeprefix(f"{self.name}: ")  # said once is enough
        raise SourceError(
            f"{self.name}: {what} failed after {tries} attempt(s) in {spent:.1f}s: {reason}"
        ) from last


def describe(exc: BaseException) -> str:
    """A one-line reason for an exception, even for those with an empty str()."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, SourceError) else f"{type(exc).__name__}: {text}"


def check_body(name: str, what: str, data: bytes, expected: int) -> bytes:
    """Refuse a short (or long) body: partial data must never reach a cache."""
    if len(data) != expected:
        raise TransientError(
            f"{name}: {what}: got {len(data)} bytes, expected {expected} (truncated reply)")
    return data


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
# Worth retrying: the server or something in front of it is overloaded or
# restarting (408 request timeout, 425 too early, 429 throttled, 5xx).
_TRANSIENT_STATUS = frozenset({408, 425, 429})


def check_status(name: str, what: str, status: int, detail: str = "") -> None:
    """Raise for an HTTP status other than 200/206: 412 means the object
    changed (never retried), 408/425/429/5xx are transient, the rest permanent."""
    if status in (200, 206):
        return
    text = f"{name}: {what}: HTTP {status} {detail}".rstrip()
    if status == 412:
        raise SourceChangedError(f"{text}: the object changed since it was opened")
    if status in _TRANSIENT_STATUS or status >= 500 or status == 0:
        raise TransientError(text)
    raise SourceError(text)


def content_range_total(header: str | None) -> int | None:
    """The object size a ``Content-Range: bytes a-b/total`` names (None: unknown)."""
    m = _CONTENT_RANGE.match(header or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def check_ranged_reply(name: str, what: str, status: int, content_range: str | None,
                       body: bytes, overflow: bool, offset: int, length: int,
                       size: int) -> bytes:
    """The body of a ranged GET whose status passed :func:`check_status`: a 206
    for exactly the range asked, or a 200 only for a read of the whole object.
    ``overflow``: the transport cut off a body longer than asked for."""
    if status == 200:
        if offset != 0 or length != size:
            raise SourceError(
                f"{name}: {what}: the server ignores Range requests (HTTP 200 with the "
                "whole object); bootcache needs byte-range support on remote bases")
    else:
        check_content_range(name, what, content_range, offset, offset + length - 1, size)
    if overflow:
        raise TransientError(f"{name}: {what}: reply longer than {length} bytes")
    return check_body(name, what, body, length)


def check_content_range(name: str, what: str, header: str | None,
                        start: int, end: int, size: int) -> None:
    """A 206 must carry exactly the range asked for, of an object of the size
    seen at open: another total means the object was replaced."""
    m = _CONTENT_RANGE.match(header or "")
    if not m:
        raise TransientError(f"{name}: {what}: bad Content-Range {header!r}")
    if m.group(3) != "*" and int(m.group(3)) != size:
        raise SourceChangedError(
            f"{name}: {what}: object size is now {m.group(3)}, was {size}")
    if (int(m.group(1)), int(m.group(2))) != (start, end):
        raise TransientError(f"{name}: {what}: server sent range {header!r}")


def clamp_read(size: int, offset: int, length: int) -> tuple[int, int]:
    """The part of [offset, offset+length) inside an object of ``size`` bytes."""
    if offset < 0 or length < 0:
        raise ValueError(f"bad read range {offset}+{length}")
    if offset >= size:
        return offset, 0
    return offset, min(length, size - offset)


def split_read(offset: int, length: int, piece: int) -> list[tuple[int, int]]:
    """Cut a read into requests of at most ``piece`` bytes."""
    return [(off, min(piece, offset + length - off))
            for off in range(offset, offset + length, piece)]


def pad(data: bytes, length: int) -> bytes:
    """Reads past the end of a source return zeros (ByteSource contract)."""
    return data if len(data) == length else data + bytes(length - len(data))



class RemoteSource(ByteSource):
    """A read-only object fetched by ranges: the part HTTP and S3 share.

    Subclasses set ``_size`` and ``_identity`` when opened and implement one
    attempt at fetching a range; this class clamps, splits, retries, counts
    and pads.
    """

    kind = "remote"

    def __init__(self, name: str, options: RemoteOptions) -> None:
        self.name = name
        self.writable = False
        self.options = options
        self.resilience = Resilience(name, options)
        self._size = 0
        self._identity: dict[str, Any] = {}
        self._identity_version = 0
        self._closed = False
        #: Largest single request; a source may lower it to what its server allows.
        self.max_request = options.max_request

    async def size(self) -> int:
        return self._size

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    #: Name of the metadata request (HEAD, HeadObject) in counters and errors.
    probe_name = "probe"

    async def _probe(self) -> dict[str, Any]:
        """One attempt at the object's identity from its metadata."""
        return self.identity()

    async def current_identity(self) -> dict[str, Any]:
        """The object's identity as the server tells it now."""
        return await self.resilience.call(self.probe_name, self._probe)

    async def _learn_version(self, release: Callable[[], Awaitable[Any]]) -> None:
        """Adopt the object's version at open; on failure, ``release`` what
        opening made (session, client) before the error goes up."""
        try:
            ident = await self.current_identity()
        except BaseException:
            await release()
            raise
        self._set_identity(ident)

    def _set_identity(self, ident: dict[str, Any]) -> None:
        self._identity = ident
        self._size = ident["size"]
        self._identity_version += 1

    def fingerprint(self) -> object:
        # The identity changes only here: a counter is enough, and caches
        # compare fingerprints on every fetch.
        return self._identity_version

    async def version_changed(self) -> bool:
        current = await self.current_identity()
        return any(current.get(k) != v for k, v in self._identity.items()
                   if k in ("size", "etag", "last_modified"))

    async def refresh_identity(self) -> dict[str, Any]:
        """Adopt the object's current version: reads stop failing with
        SourceChangedError (the caller has dropped what it held of the old one)."""
        self._set_identity(await self.current_identity())
        return self.identity()

    def stats(self) -> dict[str, int | float]:
        """Counters since the source was opened (requests, bytes, errors...)."""
        return self.resilience.stats.as_dict()

    async def _fetch(self, offset: int, length: int) -> bytes:
        """One attempt at exactly ``length`` bytes from ``offset`` (inside the object).

        Raises TransientError for failures worth retrying, SourceError otherwise.
        """
        raise NotImplementedError

    async def pread(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise SourceError(f"{self.name}: source is closed")
        offset, inside = clamp_read(self._size, offset, length)
        if inside == 0:
            return bytes(length)
        pieces = split_read(offset, inside, self.max_request)
        if len(pieces) == 1:
            data = await self._fetch_retried(offset, inside)
        else:
            data = b"".join(await gather_all(
                [self._fetch_retried(off, n) for off, n in pieces]))
        return pad(data, length)

    async def _fetch_retried(self, offset: int, length: int) -> bytes:
        return await self.resilience.call(
            f"read {offset}+{length}", lambda: self._fetch(offset, length), size_of=len)


async def gather_all(aws: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise it as is
    (not wrapped in an ExceptionGroup, so callers still catch SourceError)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
