"""The storing side of a cache: fetched bytes into the cache image, under the quota.

One storer task per cache takes every fetch waiting and stores them as one
batch: evictions and room are decided and reserved before any await, so that
stores can never take the cache past its quota together. A full disk is
tried piece by piece, then cluster by cluster, then paused for a while (the
reads are served from the base meanwhile). A reset of the cache bumps its
generation: a fetch from before is never stored, and a store racing the
reset never maps old bytes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bootcache.block.store import CacheStore
from bootcache.layers.cache_fetch import Fetch, forget
from bootcache.layers.cache_quota import CacheQuota
from bootcache.layers.cache_stats import CacheStats

log = logging.getLogger("bootcache.cache")

_ENOSPC_RETRY = 5.0
_STORE_PIECE = 1 << 20
#: Fetched bytes waiting to be stored beyond which readers wait for the stores.
_PENDING_STORES_MAX = 16 << 20

#: Starts a coroutine as one of the cache's background tasks (named), and
#: returns it.
StartTask = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class CacheStorer:
    """Stores a cache's fetched bytes in batches, under its quota.

    It is handed what it needs of the cache: the store, the quota, the
    counters, the clusters in flight (a fetch stays there until its store is
    over, so a reader meanwhile takes its bytes and never fetches them
    again), the cache's current generation, how to start a background task
    and how to start a flush (evictions free their clusters at a flush).
    """

    def __init__(self, store: CacheStore, quota: CacheQuota, counters: CacheStats,
                 inflight: dict[int, Fetch], *, generation: Callable[[], int],
                 start_task: StartTask,
                 flush: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.store = store
        self.quota = quota
        self.counters = counters
        self.inflight = inflight
        self.name = store.name
        self.cs = store.cluster_size
        self._generation = generation
        self._start_task = start_task
        self._flush = flush
        #: Fetches whose bytes wait to be stored, and the task storing them.
        self._pending: list[Fetch] = []
        self._pending_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._evict_flush: asyncio.Task[None] | None = None
        self._paused_until = 0.0

    def queue(self, fetch: Fetch) -> None:
        """Store a fetch's bytes (arrived) in the background; a fetch from
        before a reset is never stored."""
        if fetch.generation != self._generation():
            forget(self.inflight, fetch)
            return
        self._pending.append(fetch)
        self._pending_bytes += len(fetch.data or b"")
        if self._task is None:
            self._task = self._start_task(self._run(), "store")

    @property
    def falling_behind(self) -> bool:
        """Whether so many fetched bytes wait to be stored that readers should
        wait for the stores (the cache file falls behind)."""
        return self._pending_bytes > _PENDING_STORES_MAX

    async def landed(self) -> None:
        """Wait until every fetch so far was stored (or its store given up)."""
        while self._task is not None and self._task is not asyncio.current_task():
            await asyncio.wait([self._task])

    def pause(self) -> None:
        """The disk is full: store nothing for a while."""
        self._paused_until = time.monotonic() + _ENOSPC_RETRY

    async def _run(self) -> None:
        """Store fetched bytes, all those waiting at once, until none are left."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._store_batch(batch)
                except Exception as e:
                    self.counters.background_errors += 1
                    log.warning("%s: background store failed: %s", self.name, e)
                finally:
                    for fetch in batch:
                        self._pending_bytes -= len(fetch.data or b"")
                        forget(self.inflight, fetch)
        finally:
            self._task = None
            for fetch in self._pending:  # cancelled (closing): not stored
                forget(self.inflight, fetch)
            self._pending = []
            self._pending_bytes = 0

    async def _store_batch(self, batch: list[Fetch]) -> None:
        if time.monotonic() < self._paused_until:
            return
        generation = self._generation()
        # Decided (evictions, room) and reserved before any await, so that
        # concurrent stores can never take the cache past its quota together;
        # clusters being fetched or waiting to be stored are never evicted.
        victims: list[int] = []
        plans: list[tuple[Fetch, int]] = []
        for fetch in batch:
            if fetch.generation != generation or fetch.data is None:
                continue
            evict, count = self.quota.plan_store(-(-len(fetch.data) // self.cs), self.inflight)
            victims += evict
            if count:
                plans.append((fetch, count))
        left = sum(count for _, count in plans)  # reserved, neither held nor given back
        try:
            if victims:
                await self.evict(victims)
            if plans:
                held, error = await self._store_plans(plans, generation)
                left -= held
                if error is not None:
                    raise error
        finally:
            self.quota.unreserve(left)

    async def _store_plans(self, plans: list[tuple[Fetch, int]],
                           generation: int) -> tuple[int, OSError | None]:
        """Write the first ``count`` clusters of each fetch as one batch (in
        pieces of at most 1 MiB); returns how many clusters are held now,
        and the error to raise once they are counted (other than a full disk)."""
        if generation != self._generation():
            return 0, None  # dropped while evictions made room: nothing may be mapped now
        cs = self.cs
        step = max(_STORE_PIECE // cs, 1)
        runs: list[tuple[int, bytes | memoryview]] = []
        for fetch, count in plans:
            assert fetch.data is not None
            view = memoryview(fetch.data)
            for k in range(0, count, step):
                n = min(step, count - k)
                runs.append((fetch.start + k, view[k * cs:(k + n) * cs]))
        try:
            await self.store.store_runs(runs)
        except OSError as e:
            return await self._store_after_error(plans, generation, e)
        if generation != self._generation():
            return 0, None  # dropped meanwhile: these clusters are being unmapped
        for fetch, count in plans:
            self._held_now(fetch.start, count)
        return sum(count for _, count in plans), None

    async def _store_after_error(self, plans: list[tuple[Fetch, int]], generation: int,
                                 error: OSError) -> tuple[int, OSError | None]:
        """A batch failed part way: count what it stored; on a full disk, try
        the rest piece by piece (then cluster by cluster), else hand the
        error back."""
        cs = self.cs
        size = self.store.size
        held = 0
        rest: list[tuple[int, int, memoryview]] = []
        for fetch, count in plans:
            view = memoryview(fetch.data or b"")
            off = fetch.start * cs
            for is_held, guest, n, _ in await self.store.lookup(off, min(count * cs,
                                                                        size - off)):
                first, k = guest // cs, -(-n // cs)
                if not is_held:
                    skip = first - fetch.start
                    rest.append((first, k, view[skip * cs:(skip + k) * cs]))
                elif generation == self._generation():
                    self._held_now(first, k)
                    held += k
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            return held, error  # (the reservation of the rest is given back by the caller)
        for first, k, part in rest:
            if time.monotonic() < self._paused_until:
                break  # the disk is full: the rest is served from the base
            got, failed = await self._store_pieces(first, part, k, generation)
            held += got
            if failed is not None:
                return held, failed
        return held, None

    def _held_now(self, first: int, count: int) -> None:
        """Reserved clusters [first, first + count) were stored: held from now on."""
        self.quota.stored(range(first, first + count))
        self.counters.clusters_stored += count

    async def _store_pieces(self, start: int, view: memoryview, count: int,
                            generation: int) -> tuple[int, OSError | None]:
        """Write ``count`` clusters in pieces, so that a disk filling up keeps
        what fitted; when a piece does not fit, go on cluster by cluster.
        Returns how many were stored, and an error other than a full disk
        that stopped it."""
        cs = self.cs
        step = max(_STORE_PIECE // cs, 1)
        first = start
        while first < start + count:
            if generation != self._generation():
                # The cache was dropped (maybe while evictions made room): a
                # write queued behind the reset's unmap would map old bytes.
                break
            n = min(step, start + count - first)
            try:
                await self.store.store(first, view[(first - start) * cs:(first - start + n) * cs])
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    return first - start, e
                if step > 1:
                    step = 1
                    continue
                # The read still succeeds from the base; try caching again later.
                self.pause()
                self.counters.no_space += 1
                log.warning("%s: no space to cache (%s); serving from the base, caching "
                            "again in %.0f s", self.name, e, _ENOSPC_RETRY)
                break
            if generation != self._generation():
                break  # the cache was dropped meanwhile: this piece is being unmapped
            self._held_now(first, n)
            first += n
        return first - start, None

    async def evict(self, victims: list[int]) -> None:
        """Make clusters unallocated again (the caller already forgot them)."""
        if not victims:
            return
        self.quota.forget(victims)
        await self.store.unmap(victims)
        self.counters.evictions += len(victims)
        # Frees (and hole punching) happen at a flush: start one now, in the
        # background, so the store that evicted does not wait on its syncs.
        if self._evict_flush is None or self._evict_flush.done():
            self._evict_flush = self._start_task(self._flush(), "flush after eviction")
