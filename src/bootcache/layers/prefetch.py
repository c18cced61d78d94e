"""Prefetch: fetch the clusters a cache's boot profile names, before a guest asks.

The prefetcher walks the profile in order, skips what the cache holds (so a
restarted daemon resumes where it stopped), and fetches what is missing in
requests whose size and number ramp up with how long readers have been
quiet (``RAMP``): none while guests are reading, then one small request at
a time, growing, and ``concurrency`` requests of ``request_bytes`` only
after a long quiet. A reader that arrives mid-prefetch thus waits for at
most one small request on the link, and its read goes on a base connection
no prefetch reply is queued on (its requests run as background reads,
sources/priority.py). It stops at the quota (it never evicts). It talks to
the cache only through layers/cache_profile.PrefetchTarget (``profile``,
``holds``, ``room``, ``demand_in_flight``, ``reads_served``, ``fill``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bootcache.layers.cache_profile import PrefetchTarget
from bootcache.sources.priority import background

log = logging.getLogger("bootcache.prefetch")

DEFAULT_CONCURRENCY = 2
DEFAULT_REQUEST = 1 << 20
#: No request starts until readers have neither read nor waited on the base for this long.
DEFAULT_QUIET = 0.02
#: Then, by how long readers have been quiet (seconds): one request at a time
#: of at most this many bytes (about 1, 2 and 4 ms on a 1 Gbit/s link: what a
#: reader arriving then may wait for)...
RAMP = ((DEFAULT_QUIET, 128 << 10), (0.25, 256 << 10), (1.0, 512 << 10))
#: ...and from this long on, ``concurrency`` requests of ``request_bytes``.
DEFAULT_LONG_QUIET = 2.0


@dataclass
class PrefetchResult:
    #: Bytes of profile clusters the cache did not hold when the prefetch began.
    planned_bytes: int = 0
    fetched_bytes: int = 0
    #: "done", "quota" (the cache is full), "stopped" (closed) or "failed".
    outcome: str = "done"


class Prefetcher:
    """Fills one cache from its profile, in the background or to completion."""

    def __init__(self, cache: PrefetchTarget, *, concurrency: int = DEFAULT_CONCURRENCY,
                 request_bytes: int = DEFAULT_REQUEST, quiet: float = DEFAULT_QUIET,
                 long_quiet: float = DEFAULT_LONG_QUIET,
                 progress: Callable[[int], None] | None = None) -> None:
        """``quiet`` 0: no reader to make way for (``cache warm``): full speed
        at once. Otherwise the ramp starts after ``quiet`` seconds without
        readers and reaches full speed after ``long_quiet``."""
        self.cache = cache
        self.concurrency = max(concurrency, 1)
        self.request_clusters = max(request_bytes // cache.cs, 1)
        self.quiet = quiet
        self.long_quiet = max(long_quiet, quiet)
        # (quiet seconds, clusters per request): each step one request at a time.
        self.ramp = [(max(t, quiet), max(min(n, request_bytes) // cache.cs, 1))
                     for t, n in RAMP if t < self.long_quiet]
        # How often a waiting prefetch looks at the readers again (a miss that
        # comes and goes meanwhile still shows in reads_served).
        self._poll = max(quiet / 4, 0.001)
        self._last_demand = time.monotonic()
        self._last_reads = cache.reads_served()
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

    # -- running -------------------------------------------------------------------

    def start(self) -> Prefetcher:
        """Run in the background; the cache stops it when it closes."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="prefetch")
        self.cache.on_close.append(self.stop)
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

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
        res = self.result
        runs = self.missing()
        res.planned_bytes = self.planned_bytes()
        if not runs:
            return res
        log.info("%s: prefetching %d bytes of the boot profile", self.cache.name,
                 res.planned_bytes)
        # Requests are cut from the head of these runs at the size allowed then.
        todo = deque(runs)
        pending: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        try:
            while (todo and not failure) or pending:
                limit, largest = self._allowance()
                if todo and not failure and len(pending) < limit:
                    room = self.cache.room()
                    if room <= 0:
                        res.outcome = "quota"
                        todo.clear()
                        continue
                    first, count = todo.popleft()
                    n = min(count, room, largest)
                    if n < count and room > n:
                        todo.appendleft((first + n, count - n))
                    task = asyncio.get_running_loop().create_task(self._one(first, n, failure))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    continue
                if pending:
                    # Nothing may start before one of these ends.
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(self._poll)  # readers are busy: look again soon
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

    async def _one(self, first: int, count: int, failure: list[BaseException]) -> None:
        try:
            with background():  # the base keeps guests' reads off its connection
                got = await self.cache.fill(first, count)
            self.result.fetched_bytes += got
            if self.progress is not None:
                self.progress(got)
        except Exception as e:
            failure.append(e)

    def _allowance(self) -> tuple[int, int]:
        """(requests that may be in flight, clusters per request) right now.

        Readers go first: none while a reader read (hit or miss) or waited on
        the base in the last ``quiet`` seconds; then one request at a time,
        growing along ``RAMP`` (a miss arriving then queues behind at most
        that one request on the link, and a hit waits for little work of
        ours in the event loop); full concurrency and large requests only
        once readers have been quiet for ``long_quiet``.
        """
        if not self.quiet:
            return self.concurrency, self.request_clusters
        now = time.monotonic()
        reads = self.cache.reads_served()
        if self.cache.demand_in_flight() or reads != self._last_reads:
            self._last_demand = now
            self._last_reads = reads
        idle = now - self._last_demand
        if idle >= self.long_quiet:
            return self.concurrency, self.request_clusters
        allowed = 0, 0
        for after, clusters in self.ramp:
            if idle >= after:
                allowed = 1, clusters
        return allowed
