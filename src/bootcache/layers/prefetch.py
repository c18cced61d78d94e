"""Prefetch: fetch the clusters a cache's boot profile names, before a guest asks.

The prefetcher walks the profile in order, skips what the cache holds (so a
restarted daemon resumes where it stopped), merges what is missing into
requests of up to ``request_bytes`` and keeps at most ``concurrency`` of them
in flight. Demand misses go first: a new request starts only once no reader
has been waiting on the base for ``quiet`` seconds, so a reader waits at most
behind the requests already on the wire. It stops at the quota (it never
evicts). It talks to the cache only through CacheProfileMixin's interface
(``profile``, ``holds``, ``room``, ``demand_in_flight``, ``fill``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bootcache.layers.cache import CacheLayer

log = logging.getLogger("bootcache.prefetch")

DEFAULT_CONCURRENCY = 2
DEFAULT_REQUEST = 1 << 20
DEFAULT_QUIET = 0.002


@dataclass
class PrefetchResult:
    #: Bytes of profile clusters the cache did not hold when the prefetch began.
    planned_bytes: int = 0
    fetched_bytes: int = 0
    #: "done", "quota" (the cache is full), "stopped" (closed) or "failed".
    outcome: str = "done"


class Prefetcher:
    """Fills one cache from its profile, in the background or to completion."""

    def __init__(self, cache: CacheLayer, *, concurrency: int = DEFAULT_CONCURRENCY,
                 request_bytes: int = DEFAULT_REQUEST, quiet: float = DEFAULT_QUIET,
                 progress: Callable[[int], None] | None = None) -> None:
        self.cache = cache
        self.concurrency = max(concurrency, 1)
        self.request_clusters = max(request_bytes // cache.cs, 1)
        self.quiet = quiet
        #: Called with the bytes each finished request fetched.
        self.progress = progress
        self.result = PrefetchResult()
        self._task: asyncio.Task[PrefetchResult] | None = None

    def missing(self) -> list[tuple[int, int]]:
        """Profile runs the cache does not hold, in profile order."""
        prof = self.cache.profile
        if prof is None:
            return []
        runs: list[tuple[int, int]] = []
        for start, count in prof.ranges:
            run_start = None
            for ci in range(start, start + count + 1):
                if ci < start + count and not self.cache.holds(ci):
                    if run_start is None:
                        run_start = ci
                elif run_start is not None:
                    runs.append((run_start, ci - run_start))
                    run_start = None
        return runs

    def planned_bytes(self) -> int:
        size, cs = self.cache.size, self.cache.cs
        return sum(min(n * cs, size - s * cs) for s, n in self.missing())

    def _requests(self, runs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        step = self.request_clusters
        for start, count in runs:
            for first in range(start, start + count, step):
                yield first, min(step, start + count - first)

    # -- running -------------------------------------------------------------------

    def start(self) -> Prefetcher:
        """Run in the background; the cache stops it when it closes."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="prefetch")
        self.cache.on_close.append(self.stop)
        return self

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def wait(self) -> PrefetchResult:
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def run(self) -> PrefetchResult:
        runs = self.missing()
        res = self.result
        res.planned_bytes = self.planned_bytes()
        if not runs:
            return res
        log.info("%s: prefetching %d bytes of the boot profile", self.cache.name,
                 res.planned_bytes)
        slots = asyncio.Semaphore(self.concurrency)
        pending: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        try:
            for first, count in self._requests(runs):
                await slots.acquire()
                if failure:
                    slots.release()
                    break
                await self._demand_first()
                room = self.cache.room()
                if room <= 0:
                    slots.release()
                    res.outcome = "quota"
                    break
                task = asyncio.get_running_loop().create_task(
                    self._one(first, min(count, room), slots, failure))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        except asyncio.CancelledError:
            # Stopped (the cache closes): requests on the wire finish and are
            # stored, so a restart does not fetch their bytes again.
            res.outcome = "stopped"
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        if failure:
            res.outcome = "failed"
            log.warning("%s: prefetch stopped: %s", self.cache.name, failure[0])
        log.info("%s: prefetch %s, %d bytes fetched", self.cache.name, res.outcome,
                 res.fetched_bytes)
        return res

    async def _one(self, first: int, count: int, slots: asyncio.Semaphore,
                   failure: list[BaseException]) -> None:
        try:
            got = await self.cache.fill(first, count)
            self.result.fetched_bytes += got
            if self.progress is not None:
                self.progress(got)
        except Exception as e:
            failure.append(e)
        finally:
            slots.release()

    async def _demand_first(self) -> None:
        """Wait until no reader has waited on the base for ``quiet`` seconds."""
        cache = self.cache
        idle_since = time.monotonic() if cache.demand_in_flight() == 0 else None
        while True:
            if cache.demand_in_flight():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.quiet:
                return
            await asyncio.sleep(max(self.quiet / 2, 0.001))
