"""The version of a source's content, watched: one :class:`BaseVersion` per source.

A base can be replaced while caches serve it (a new object under the same
URL, a file rewritten in place). Every layer reading the source must then
hear of it once, in one order, whoever noticed first: the background
version check, a read meeting a new ETag (SourceChangedError), or a cheap
fingerprint compared on the read path. The watcher belongs to the source
(``ByteSource.version``), so the layers over one source (the node graph
shares them) share it too.

A change is handled once, in two steps, each heard by every listener in the
order they subscribed (a layer subscribes when it opens, after the layers
it reads from):

1. ``base_stale``: the source still has its old identity, so reads of it
   fail rather than return new bytes; caches stop serving and drop what
   they hold (or refuse, per their policy);
2. the source adopts its new version (``refresh_identity``), and
   ``base_adopted``: layers follow it (a raw layer takes the new size, a
   cache records the new identity or reopens a qcow2 base).

Detections carry the version they observed (:attr:`BaseVersion.current`
before they looked); one made before a change ended is covered by it, so
one replacement gives exactly one event, however many detectors saw it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("bootcache.version")

#: The read path compares the fingerprint at most this often: under load the
#: comparison (an fstat for files) would cost more than the read.
FINGERPRINT_INTERVAL_NS = 200_000


class VersionedSource(Protocol):
    """What the watcher asks of a source (ByteSource implements it)."""

    name: str
    #: Seconds between version checks while reads go on (None: it cannot check cheaply).
    version_check_interval: float | None

    def fingerprint(self) -> object:
        """A cheap value that moves whenever the content's identity does."""

    async def version_changed(self) -> bool:
        """Ask the server whether the content changed since it was adopted."""

    async def refresh_identity(self) -> dict[str, Any]:
        """Adopt the content's current version; returns its identity."""


class VersionListener(Protocol):
    """A layer that must react when its source's content changes."""

    async def base_stale(self, version: BaseVersion) -> None:
        """The content changed; the source still refuses the new one."""

    async def base_adopted(self, version: BaseVersion) -> None:
        """The source now serves its new content (or failed to adopt it:
        :attr:`BaseVersion.current` then did not move)."""


class BaseVersion:
    """The content version of one source: ``current``, ``subscribe``, and the
    detections that move it."""

    def __init__(self, source: VersionedSource) -> None:
        self.source = source
        self.name = source.name
        #: Changes adopted since the source was opened.
        self.current = 0
        #: Background version checks that failed (the base did not answer).
        self.failed_checks = 0
        self._listeners: list[VersionListener] = []
        self._fingerprint = source.fingerprint()
        self._fp_checked = 0
        interval = source.version_check_interval
        self._interval_ns = int(interval * 1e9) if interval else 0
        self._checked = time.monotonic_ns()
        self._changing: asyncio.Future[None] | None = None
        self._check: asyncio.Task[None] | None = None

    def subscribe(self, listener: VersionListener) -> Callable[[], None]:
        """Hear of every change from now on; returns the unsubscribe call."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
        return unsubscribe

    @property
    def changing(self) -> bool:
        """A change is being handled (listeners are hearing of it)."""
        return self._changing is not None

    # -- detections ----------------------------------------------------------------

    def poll(self) -> bool:
        """The read path's cheap look, no await: True while a change is being
        handled, or when the fingerprint moved (compared at most every 200 us;
        report it with :meth:`changed`).
        Also starts a background check of the version when the source's
        interval has passed: a warm cache never reads the base, so it would
        never meet a new ETag. The clock runs on reads: an idle node asks nothing."""
        if self._changing is not None:
            return True
        now = time.monotonic_ns()
        if self._interval_ns and now - self._checked >= self._interval_ns:
            import asyncio  # here: layers that never serve (info, check) skip its import

            self._checked = now
            if self._check is None or self._check.done():
                self._check = asyncio.get_running_loop().create_task(
                    self._background_check(), name=f"version check of {self.name}")
        if now - self._fp_checked < FINGERPRINT_INTERVAL_NS:
            return False
        if self.moved():
            return True  # not noted as checked: every reader sees it until it is handled
        self._fp_checked = now
        return False

    def moved(self) -> bool:
        """Whether the fingerprint moved since the current version was adopted."""
        return self.source.fingerprint() != self._fingerprint

    async def check(self) -> None:
        """Ask the source for its version now; a change is handled before this returns."""
        observed = self.current
        if await self.source.version_changed():
            await self.changed(observed)

    async def _background_check(self) -> None:
        try:
            await self.check()
        except Exception as e:  # a base that does not answer: the next check asks again
            self.failed_checks += 1
            log.warning("%s: version check failed: %s", self.name, e)

    async def changed(self, observed: int) -> None:
        """A detector that began looking at version ``observed`` saw a change:
        handle it, unless a change since then already did. Returns once every
        listener heard of it; raises the first listener's error, if any."""
        import asyncio

        while self._changing is not None:
            await asyncio.shield(self._changing)
        if self.current != observed:
            return  # a change that began after this observation covered it
        self._changing = asyncio.get_running_loop().create_future()
        errors: list[BaseException] = []
        try:
            await self._tell("base_stale", errors)
            try:
                await self.source.refresh_identity()
            except Exception as e:
                errors.append(e)
            else:
                self._fingerprint = self.source.fingerprint()
                self.current += 1
            await self._tell("base_adopted", errors)
        finally:
            self._changing.set_result(None)
            self._changing = None
        if errors:
            raise errors[0]

    async def _tell(self, step: str, errors: list[BaseException]) -> None:
        for listener in list(self._listeners):
            try:
                await getattr(listener, step)(self)
            except Exception as e:
                log.warning("%s: %s of a layer failed: %s", self.name, step, e)
                errors.append(e)

    async def settle(self) -> None:
        """Wait for a background check, and a change, in progress."""
        import asyncio

        while self._check is not None and not self._check.done():
            await asyncio.wait([self._check])
        while self._changing is not None:
            await asyncio.shield(self._changing)

    async def close(self) -> None:
        """Stop a background check in progress (the source is closing)."""
        if self._check is not None and not self._check.done():
            import asyncio

            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
