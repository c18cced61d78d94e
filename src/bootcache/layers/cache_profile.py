"""The boot profile of a cache layer, and what a prefetcher may ask of it.

Mixed into CacheLayer (layers/cache.py) so that the miss path stays in one
place: the layer records each first fetch here, and layers/prefetch.py
fills the cache through :meth:`CacheProfileMixin.fill` and friends, never
through the layer's private state. Format: docs/spec/cache-image.md, section 13.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from bootcache.errors import ImageFormatError
from bootcache.qcow2 import cache_ext, profile_ext
from bootcache.qcow2.cache_ext import CacheExtension
from bootcache.qcow2.image import Qcow2Image

log = logging.getLogger("bootcache.cache")


class CacheProfileMixin:
    """The boot profile and the prefetch interface of a cache (mixed into
    CacheLayer; layers/prefetch.py is the prefetcher, docs/spec section 13)."""

    # Provided by CacheLayer.
    name: str
    cs: int
    img: Qcow2Image
    ext: CacheExtension
    cached: OrderedDict[int, None]
    inflight: Mapping[int, object]
    _fetch_run: Callable[[int, int], Coroutine[Any, Any, None]]
    _used: Callable[[], int]

    def _init_profile(self) -> None:
        #: The boot profile: None if the image's cannot be used (it is then left alone).
        self.profile: profile_ext.Profile | None = None
        self._profile_dirty = False
        #: Clusters the prefetcher stored, and reads that then hit them.
        self.prefetched: set[int] = set()
        self.prefetched_bytes = 0
        self.prefetch_hits = 0
        #: Called (awaited) first when the cache closes: a prefetch stops there.
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self._prefetch_inflight = 0

    def _load_profile(self) -> None:
        try:
            prof = profile_ext.read_profile(self.img.header)
        except ImageFormatError as e:
            log.warning("%s: %s; the profile is ignored and kept as it is", self.name, e)
            return
        if prof is None:
            prof = profile_ext.Profile(self.img.size, self.cs)
        elif prof.virtual_size != self.img.size:
            log.warning("%s: the boot profile is for a %d-byte disk, the image has %d bytes; "
                        "ignored", self.name, prof.virtual_size, self.img.size)
            return
        self.profile = prof.regrain(self.cs)

    def _record_profile(self, start: int, count: int) -> None:
        prof = self.profile
        if prof is not None and not prof.complete:
            self._profile_dirty |= prof.record(start, count, self.ext.quota // self.cs)

    def _count_prefetch_hit(self, offset: int, length: int) -> None:
        prefetched = self.prefetched
        for ci in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            if ci in prefetched:
                self.prefetch_hits += 1
                return

    # -- what the prefetcher may ask and do ---------------------------------------

    def holds(self, ci: int) -> bool:
        """Whether a cluster is cached or being fetched."""
        return ci in self.cached or ci in self.inflight

    def room(self) -> int:
        """Clusters a prefetch may still store: it never evicts, so up to the
        quota (stop) or the high watermark (lru)."""
        limit = self.ext.quota
        if self.ext.policy == cache_ext.POLICY_LRU:
            limit = limit * self.ext.high_watermark // 100
        return max(limit // self.cs - self._used(), 0)

    def reads_served(self) -> int:
        """Reads served so far, hits and misses (it moves while guests read)."""
        return self.ext.hits + self.ext.misses

    def demand_in_flight(self) -> int:
        """Clusters being fetched for readers (not for a prefetch)."""
        return len(self.inflight) - self._prefetch_inflight

    async def fill(self, start: int, count: int) -> int:
        """Fetch and store clusters [start, start + count) that are neither
        cached nor in flight, as a demand miss would; returns the bytes fetched.
        A reader asking for one of them meanwhile waits for this fetch."""
        runs: list[tuple[int, int]] = []
        for ci in range(start, start + count):
            if self.holds(ci):
                continue
            if runs and sum(runs[-1]) == ci:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((ci, 1))
        fetched = 0
        for first, n in runs:
            self._prefetch_inflight += n
            try:
                await self._fetch_run(first, n)
            finally:
                self._prefetch_inflight -= n
            got = min(n * self.cs, self.img.size - first * self.cs)
            fetched += got
            self.prefetched_bytes += got
            self.prefetched.update(ci for ci in range(first, first + n) if ci in self.cached)
        return fetched
