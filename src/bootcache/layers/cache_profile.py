"""A cache's boot profile, and what a prefetcher may ask of a cache.

:class:`ProfileRecorder` is owned by the cache layer: it loads the profile
from the store, records each first fetch, notes which clusters a prefetch
brought and counts the reads that then hit them. :class:`PrefetchTarget` is
all a prefetcher (layers/prefetch.py) sees of a cache. Format:
docs/spec/cache-image.md, section 13.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from bootcache.block.store import CacheStore
from bootcache.errors import ImageFormatError
from bootcache.layers.cache_stats import CacheStats
from bootcache.qcow2 import profile_ext

log = logging.getLogger("bootcache.cache")


class ProfileRecorder:
    """The boot profile of one cache, and its prefetch hits."""

    def __init__(self, name: str, cluster_size: int, stats: CacheStats) -> None:
        self.name = name
        self.cs = cluster_size
        self.stats = stats
        #: The boot profile: None if the image's cannot be used (it is then left alone).
        self.profile: profile_ext.Profile | None = None
        self.dirty = False
        #: Clusters a prefetch stored (reads hitting them count as prefetch hits).
        self.prefetched: set[int] = set()

    def load(self, store: CacheStore) -> None:
        try:
            prof: profile_ext.Profile | None = store.read_profile()
        except ImageFormatError as e:
            log.warning("%s: %s; the profile is ignored and kept as it is", self.name, e)
            return
        if prof is None:
            prof = profile_ext.Profile(store.size, self.cs)
        elif prof.virtual_size != store.size:
            log.warning("%s: the boot profile is for a %d-byte disk, the image has %d bytes; "
                        "ignored", self.name, prof.virtual_size, store.size)
            return
        self.profile = prof.regrain(self.cs)

    def record(self, start: int, count: int, limit: int) -> None:
        """Clusters [start, start+count) were fetched (up to ``limit`` are named)."""
        prof = self.profile
        if prof is not None and not prof.complete:
            self.dirty |= prof.record(start, count, limit)

    def take(self) -> profile_ext.Profile | None:
        """The profile to save with the cache's records, if it changed."""
        if not self.dirty or self.profile is None:
            return None
        self.dirty = False
        return self.profile

    def count_hit(self, offset: int, length: int) -> None:
        """A read of [offset, offset+length) was served from the cache."""
        prefetched = self.prefetched
        if not prefetched:
            return
        for ci in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            if ci in prefetched:
                self.stats.prefetch_hits += 1
                return

    def prefetched_run(self, fetched: int, stored: list[int]) -> None:
        """A prefetch fetched ``fetched`` bytes, of which clusters ``stored`` were kept."""
        self.stats.prefetched_bytes += fetched
        self.prefetched.update(stored)

    def forget_prefetched(self) -> None:
        """The cache was dropped: refetched clusters are not prefetch hits."""
        self.prefetched.clear()


class PrefetchTarget(Protocol):
    """What a prefetcher may ask of a cache, and do to it."""

    name: str
    #: Called (awaited) first when the cache closes: a prefetch stops there.
    on_close: list[Callable[[], Awaitable[None]]]

    @property
    def size(self) -> int: ...

    @property
    def cs(self) -> int: ...

    @property
    def profile(self) -> profile_ext.Profile | None:
        """The cache's boot profile (None: none that can be used)."""

    def holds(self, ci: int) -> bool:
        """Whether a cluster is cached or being fetched."""

    def room(self) -> int:
        """Clusters a prefetch may still store (it never evicts)."""

    def reads_served(self) -> int:
        """Reads served so far, hits and misses (it moves while guests read)."""

    def demand_in_flight(self) -> int:
        """Clusters being fetched for readers (not for a prefetch)."""

    async def fill(self, start: int, count: int) -> int:
        """Fetch and store clusters [start, start + count) that are neither
        cached nor in flight, as a demand miss would; returns the bytes fetched."""
