"""The cache layer: copy-on-read into a qcow2 cache image, under a quota.

A read is split (as nbdkit's cache filter splits it) into runs the cache
holds, served from the image, and runs it misses. A miss fetches the whole
aligned clusters from the base once, however many readers want them at the
same moment (single flight), stores them if the quota allows, and returns
the bytes asked for. Clients can never write: the copy-on-read path is the
only writer, so every cached byte is a copy of the base.

On-disk format and rules: docs/spec/cache-image.md.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from bootcache.block.graph import NodeRef
from bootcache.block.layer import NOWAIT_MAX, BlockLayer, Extent, chain_of
from bootcache.block.store import CacheStore
from bootcache.errors import BootcacheError, ImageCorruptError, ImageFormatError, StaleBaseError
from bootcache.layers.cache_fetch import Fetch, forget
from bootcache.layers.cache_profile import ProfileRecorder
from bootcache.layers.cache_quota import CacheQuota
from bootcache.layers.cache_stats import CacheStats
from bootcache.layers.cache_storer import CacheStorer
from bootcache.qcow2 import cache_ext, profile_ext
from bootcache.qcow2.cache_ext import CacheExtension
from bootcache.qcow2.cache_store import Qcow2CacheStore
from bootcache.qcow2.format import EXT_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.version import BaseVersion

log = logging.getLogger("bootcache.cache")

_SAMPLES = 8
_SAMPLE_BYTES = 4096
_FLUSH_INTERVAL = 1.0


def read_extension(img: Qcow2Image) -> CacheExtension | None:
    """The cache extension of an image, or None for an ordinary qcow2."""
    ext = img.header.find_extension(EXT_CACHE)
    return CacheExtension.decode(ext.data) if ext else None


def _extension_of(store: CacheStore) -> CacheExtension | None:
    data = store.record(EXT_CACHE)
    return CacheExtension.decode(data) if data is not None else None


async def base_identity(base: BlockLayer) -> dict[str, Any]:
    """The identity a cache records of ``base`` (spec section 5): its source's
    facts plus a hash of sampled blocks."""
    ident = dict(base.identity())
    size = base.size
    h = hashlib.sha256(str(size).encode())
    step = max(size // _SAMPLES, 1)
    for off in range(0, size, step):
        h.update(await base.pread(off, min(_SAMPLE_BYTES, size - off)))
    ident["virtual_size"] = size
    ident["content_sha256"] = h.hexdigest()
    return ident


#: Where a piece of a miss comes from: a fetch (None: the cache, stored
#: meanwhile) and the piece's guest byte range [lo, hi).
_Segment = tuple[Fetch | None, int, int]


#: A planned piece of a read: bytes read, or the segments of a miss.
_Part = bytes | memoryview | list[_Segment]


def _joined(pieces: list[bytes | memoryview]) -> bytes:
    """The reply: one fetch's bytes as they are, else the one copy of the
    read (fetched buffers are sliced as memoryviews)."""
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)


def _slice(fetch: Fetch, lo: int, hi: int, cs: int) -> bytes | memoryview:
    """Guest bytes [lo, hi) of a fetch's bytes, without a copy."""
    data = fetch.data
    assert data is not None
    base = fetch.start * cs
    if lo == base and hi - lo == len(data):
        return data
    return memoryview(data)[lo - base:hi - base]


class CacheLayer(BlockLayer):
    """A read-only view of a base, filling a cache store on the way.

    It keeps single flight and policy (quota and recency, what a changed base
    means); the store (block/store.py) keeps the clusters and the records.
    """

    self_writing = True

    def __init__(self, store: CacheStore, ext: CacheExtension) -> None:
        self.store = store
        self.ext = ext
        self.name = store.name
        self.cs = store.cluster_size
        #: Counters, read by the daemon through metrics().
        self.counters = CacheStats.from_extension(ext)
        #: Held clusters in recency order, reservations, the quota's decisions.
        self.quota = CacheQuota(ext, self.cs)
        #: Clusters being fetched from the base, each to the fetch bringing it.
        self.inflight: dict[int, Fetch] = {}
        self.recorder = ProfileRecorder(self.name, self.cs, self.counters)
        #: Called (awaited) first when the cache closes: a prefetch stops there.
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self._prefetch_inflight = 0
        self._last_flush = time.monotonic()
        #: The version of the base's source, watched (None: a base that has none).
        self.base_version: BaseVersion | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: Reopens the base when it changed in a way it cannot follow (qcow2).
        self.reopen_base: Callable[[], Coroutine[Any, Any, NodeRef]] | None = None
        #: Clusters fetched beyond a miss, in the same request (0: none).
        self.readahead = 0
        #: Bumped when a reset of the cache begins and again when it ends: fetches
        #: from before must not be stored, reads that overlapped it read again.
        self._generation = 0
        #: Set while a reset runs: readers wait for it.
        self._resetting: asyncio.Future[None] | None = None
        #: Why this cache refuses to serve (on_stale=refuse), once it does.
        self._refusal: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Stores fetched bytes in the background, under the quota.
        self.storer = CacheStorer(self.store, self.quota, self.counters, self.inflight,
                                  generation=self.content_version,
                                  start_task=self._background, flush=self._flush_if_open)
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def base(self) -> BlockLayer:
        """The layer the cache copies from (its image's backing file)."""
        return self.store.base

    @property
    def profile(self) -> profile_ext.Profile | None:
        """The boot profile (None: the image's cannot be used)."""
        return self.recorder.profile

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(cls, img: Qcow2Image) -> CacheLayer:
        """Wrap an image opened writable (keeping the cache autoclear bit)."""
        return await cls.over(Qcow2CacheStore(img))

    @classmethod
    async def over(cls, store: CacheStore) -> CacheLayer:
        """A cache over a store whose records include the cache extension."""
        ext = _extension_of(store)
        if ext is None:
            raise ImageFormatError(f"{store.name}: not a cache image")
        layer = cls(store, ext)
        layer._watch_base()
        try:
            layer.recorder.load(store)
            await layer._reclaim_leaks()
            layer.quota.add(await store.held_clusters())
            await layer._check_base(store.marked_consistent())
        except BaseException:
            if layer._unsubscribe is not None:
                layer._unsubscribe()  # the base may be shared: leave it no listener
            raise
        # The checks above read metadata the first reads may never need: a
        # node holds many caches, most of them idle.
        store.drop_clean_metadata()
        return layer

    async def _reclaim_leaks(self) -> None:
        """Give back clusters a crash left allocated but unreferenced.

        A killed filler leaves its unflushed stores as leaks (never as wrong
        data); a cache is long-lived and refilled after every crash, so the
        owner repairs them at open rather than letting them pile up.
        """
        fixed, corruptions = await self.store.repair_leaks()
        if fixed:
            log.warning("%s: reclaimed %d leaked clusters", self.name, fixed)
        if corruptions:
            raise ImageCorruptError(
                f"{self.name}: {corruptions} corruptions; run bootcache check -r all")

    async def _check_base(self, consistent: bool) -> None:
        """Refuse or reset on a changed base; revalidate after a foreign writer."""
        before = self.ext.encode() if consistent else None
        current = await self.base_identity()
        recorded = self.ext.identity
        if recorded and recorded != current:
            changed = sorted(k for k in set(recorded) | set(current)
                             if recorded.get(k) != current.get(k))
            msg = f"{self.name}: the base changed since the cache was filled ({', '.join(changed)})"
            if self.ext.on_stale == cache_ext.ON_STALE_REFUSE:
                raise StaleBaseError(msg + "; refusing to serve (on_stale=refuse)")
            log.warning("%s; dropping %d cached clusters", msg, len(self.quota))
            await self._drop_all()
            self.counters.resets += 1
        elif not consistent:
            # A writer that does not know the extension opened the image (it
            # cleared our autoclear bit): every cached cluster must be proven.
            await self._revalidate()
        self.ext.identity = current
        self.counters.save_into(self.ext)
        self.ext.used_bytes = self.quota.used_bytes()
        if self.ext.encode() != before:  # an unchanged image is not written at open
            await self._persist_extension()

    async def base_identity(self) -> dict[str, Any]:
        """Identity of the base: its source's facts plus a hash of sampled blocks."""
        return await base_identity(self.base)

    async def _revalidate(self) -> None:
        # Zero clusters are never written by a cache: they can only hide base data.
        await self.store.drop_foreign_zeros()
        bad = []
        for ci in list(self.quota.held):
            off = ci * self.cs
            n = min(self.cs, self.size - off)
            if await self.store.read(off, n) != await self.store.read_below(off, n):
                bad.append(ci)
        log.warning("%s: revalidated %d cached clusters after a foreign writer, dropped %d",
                    self.name, len(self.quota), len(bad))
        if bad:
            await self.storer.evict(bad)
            await self.store.flush()

    async def _drop_all(self) -> None:
        # Stores in progress see the new generation and stop; what they already
        # wrote is allocated by then, and unmapped here with the rest.
        self._generation += 1
        self.quota.clear()
        # Fetches in flight may bring old bytes: readers from now on must not
        # wait for them (their own readers still get them, and read again).
        self.inflight.clear()
        self.recorder.forget_prefetched()
        if await self.store.unmap_all():
            await self.store.flush()
        self.quota.clear()

    # -- BlockLayer -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def read_only(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return self.store.identity()

    def content_version(self) -> int:
        # Bumped when a reset starts and when it ends.
        return self._generation

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        if (self._resetting is not None or self._refusal is not None or offset < 0
                or length > NOWAIT_MAX or offset + length > self.store.size):
            return None
        version = self.base_version
        if version is not None and version.poll():
            return None  # the base changed (or is changing): pread() deals with it
        data = self._hit_now(offset, length)
        return data if data is not None else self._read_now(offset, length)

    def _hit_now(self, offset: int, length: int) -> bytes | None:
        """A hit on host-contiguous cached clusters, looked up and read without
        yielding (so no release can intervene between lookup and read)."""
        data = self.store.read_held_nowait(offset, length)
        if data is None:
            return None
        counters = self.counters
        counters.hits += 1
        counters.bytes_from_cache += length
        if self.recorder.prefetched:
            self.recorder.count_hit(offset, length)
        if self.quota.lru:
            self.quota.touch(offset, length)
        return data

    async def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.store.size:
            self.check_range(offset, length)
        while True:
            generation = self._generation
            data = await self._pread_once(offset, length)
            if generation == self._generation:
                return data
            # A reset of the cache overlapped this read: parts of it may be of
            # the old base (cached clusters, fetches from before) and parts of
            # the new one. One request is one version: read it all again.

    async def _pread_once(self, offset: int, length: int) -> bytes:
        if self._resetting is not None:
            # The base is being switched: no byte of either version until it is.
            await asyncio.shield(self._resetting)
        if self._refusal is not None:
            # A fresh exception each time: re-raising one object would chain
            # every reader's traceback onto it for as long as clients retry.
            raise StaleBaseError(self._refusal)
        version = self.base_version
        if version is not None:
            # Checked on reads, hits included: a warm cache never misses, and
            # must still not serve bytes of a base that changed (the watcher
            # looks at most every 200 us, and asks a remote base every few
            # seconds in the background).
            observed = version.current
            if version.poll():  # moved, or a change is being handled: wait for it
                await self._report_change(version, observed)
        planned: tuple[list[_Part], int] | None = None
        if length <= NOWAIT_MAX:
            # The hot path: a hit on host-contiguous clusters, one pread.
            data = self._hit_now(offset, length)
            if data is not None:
                return data
            if self.storer.falling_behind:
                await self.storer.landed()  # the cache file falls behind: wait for it
            planned = self._plan_now(offset, length, wait=True)
        if planned is None:
            planned = await self._plan(offset, length)
        parts, from_cache = planned
        pieces: list[bytes | memoryview] = []
        for part in parts:
            if isinstance(part, list):
                pieces.extend(await self._collect(part))
            else:
                pieces.append(part)
        self._served(offset, length, from_cache)
        return _joined(pieces)

    async def _plan(self, offset: int, length: int) -> tuple[list[_Part], int]:
        """The general lookup: held runs read, misses planned (fetches
        started), and how many bytes came from the cache."""
        store = self.store
        # While this read looks up and reads held runs, the clusters it found
        # are pinned (not released for reuse). Misses only start their fetches
        # in there: the base is waited for outside, so frees never wait on it.
        parts: list[_Part] = []
        from_cache = 0
        with store.pinned():
            for run in await store.lookup(offset, length):
                held, guest, n, _ = run
                if not held:
                    got = self._miss(guest, n, wait=True)
                    assert got is not None
                    parts.extend(got)
                else:
                    from_cache += n
                    parts.append(await store.read_run(run))
        return parts, from_cache

    def _plan_now(self, offset: int, length: int, *,
                  wait: bool) -> tuple[list[_Part], int] | None:
        """:meth:`_plan` with no await (None: the lookup would have to wait).
        Held runs are read now (no await since the lookup: nothing can be
        released meanwhile, no pin needed); a miss takes fetched bytes not
        stored yet or fetches now from a base that reads without waiting (a
        local file); else, with ``wait``, starts the fetches to wait for
        (without: returns None)."""
        store = self.store
        runs = store.lookup_nowait(offset, length)
        if runs is None:
            return None
        parts: list[_Part] = []
        from_cache = 0
        for run in runs:
            if run[0]:
                data = store.read_run_nowait(run)
                if data is None:
                    return None
                from_cache += run[2]
                parts.append(data)
                continue
            got = self._miss(run[1], run[2], wait=wait)
            if got is None:
                return None
            parts.extend(got)
        return parts, from_cache

    def _served(self, offset: int, length: int, from_cache: int) -> None:
        """Count a read served (a miss when any byte came from the base)."""
        counters = self.counters
        counters.bytes_from_cache += from_cache
        if from_cache == length:
            counters.hits += 1
            self.recorder.count_hit(offset, length)
        else:
            counters.misses += 1
        self.quota.touch(offset, length)
        self._schedule_flush()

    async def settle(self) -> None:
        if self.base_version is not None:
            await self.base_version.settle()  # a version check may reset the cache
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def prefetch(self, offset: int, length: int) -> None:
        await self.pread(offset, length)

    async def image_for_publishing(self) -> Qcow2Image:
        """The cache image, with what it holds flushed (tables, header, counters),
        for publishing it while it is served (the daemon's publish): the image's
        reads are safe beside the cache's own stores and evictions."""
        await self.settle()
        await self.flush()
        if not isinstance(self.store, Qcow2CacheStore):
            raise ImageFormatError("only a qcow2 cache image can be published")
        return self.store.img

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.store.block_status(offset, length)

    async def flush(self) -> None:
        try:
            await self.store.flush()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # What is on disk stays consistent; unflushed stores are retried later
            # or lost (leaked clusters), never wrong.
            self.storer.pause()
            self.counters.no_space += 1
            log.warning("%s: no space to flush the cache (%s)", self.name, e)
            return
        await self._persist_extension()

    async def close(self) -> None:
        try:
            for hook in self.on_close:
                await hook()  # a prefetch stops before the stores settle
            # Let stores in progress land (they are part of what close persists).
            await self.settle()
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self._flush_task is not None:
                self._flush_task.cancel()
            if not self.store.closed:
                await self.flush()
        finally:
            try:
                await self.store.close()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("%s: closed without flushing (%s)", self.name, e)

    # -- misses ---------------------------------------------------------------------

    def _read_now(self, offset: int, length: int) -> bytes | None:
        """A read served without waiting (:meth:`_plan_now`), else None."""
        if self.storer.falling_behind:
            return None  # the cache file falls behind: pread() waits for it
        planned = self._plan_now(offset, length, wait=False)
        if planned is None:
            return None
        parts, from_cache = planned
        pieces: list[bytes | memoryview] = []
        for part in parts:
            assert not isinstance(part, list)  # (nothing to wait for without wait)
            pieces.append(part)
        self._served(offset, length, from_cache)
        return _joined(pieces)

    def _miss(self, offset: int, length: int, *, wait: bool) -> list[_Part] | None:
        """The bytes of a range the cache does not hold: fetched bytes not
        stored yet, or fetched now from a base that reads without waiting
        (single flight either way). Else, with ``wait``, the fetches to wait
        for are started and the plan returned as segments; without, None."""
        cs = self.cs
        first, last = offset // cs, (offset + length - 1) // cs
        inflight = self.inflight
        fetch = inflight.get(first)
        if fetch is not None and fetch.data is not None and last < fetch.start + fetch.count:
            return [_slice(fetch, offset, offset + length, cs)]  # one fetch's bytes
        # Fetch now only if no byte must be waited for anyway.
        now = True
        for ci in range(first, last + 1):
            fetch = inflight.get(ci)
            if fetch is not None and fetch.data is None:
                if not wait:
                    return None  # on its way: pread() waits for it
                now = False
                break
        generation = self._generation
        for start, count in self._runs_to_fetch(first, last):
            off = start * cs
            data = self.store.read_below_nowait(off, min(count * cs, self.size - off)) \
                if now else None
            if data is None:
                if not wait:
                    return None
                now = False
                fetch = Fetch(start, count, asyncio.get_running_loop().create_future(),
                               generation)
            else:
                fetch = Fetch(start, count, None, generation)
            for ci in range(start, start + count):
                inflight[ci] = fetch
            if data is None:
                # The reader waits for the bytes (the fetch's future); they
                # are stored afterwards, in the background.
                self._background(self._fetch(fetch), "fetch")
            else:
                self._fetched(fetch, data)
        segments = self._segments(offset, length)
        out: list[_Part] = []
        for fetch, lo, hi in segments:
            if fetch is None or fetch.data is None:
                return [segments] if wait else None  # something to wait for, or to look up
            out.append(_slice(fetch, lo, hi, cs))
        return out

    def _runs_to_fetch(self, first: int, last: int) -> list[tuple[int, int]]:
        """Runs of clusters in [first, last] neither held nor coming, the last
        one extended by read-ahead: (start, count) each."""
        cs = self.cs
        inflight, cached = self.inflight, self.quota.held
        run_start: int | None = None
        fetches = []
        for ci in range(first, last + 2):
            if ci <= last and ci not in inflight and ci not in cached:
                if run_start is None:
                    run_start = ci
                continue
            if run_start is not None:
                fetches.append((run_start, ci - run_start))
                run_start = None
        if self.readahead and fetches and sum(fetches[-1]) == last + 1:
            # Read ahead past the request while clusters are neither held nor coming.
            start = fetches[-1][0]
            stop = min(last + 1 + self.readahead, -(-self.size // cs))
            k = last + 1
            while k < stop and k not in cached and k not in inflight:
                k += 1
            fetches[-1] = (start, k - start)
        return fetches

    def _segments(self, offset: int, length: int) -> list[_Segment]:
        """Where each piece of [offset, offset + length) comes from: the fetch
        bringing its clusters (None: the cache)."""
        cs = self.cs
        inflight = self.inflight
        segments: list[_Segment] = []
        end = offset + length
        for ci in range(offset // cs, (offset + length - 1) // cs + 1):
            lo, hi = max(offset, ci * cs), min(end, (ci + 1) * cs)
            source = inflight.get(ci)
            if segments:
                prev = segments[-1]
                if prev[0] is source and prev[2] == lo:  # same source, contiguous
                    segments[-1] = (source, prev[1], hi)
                    continue
            segments.append((source, lo, hi))
        return segments

    async def _collect(self, segments: list[_Segment]) -> list[bytes | memoryview]:
        """The bytes of planned pieces: slices of fetched buffers (no copy), or
        reads of clusters stored meanwhile."""
        out: list[bytes | memoryview] = []
        cs = self.cs
        for fetch, lo, hi in segments:
            if fetch is None:
                out.append(await self.store.read(lo, hi - lo))
                continue
            if fetch.data is None:
                assert fetch.future is not None
                await fetch.future
            out.append(_slice(fetch, lo, hi, cs))
        return out

    async def _fetch_run(self, start: int, count: int) -> None:
        """Fetch clusters [start, start+count), which are neither cached nor
        in flight; readers asking for them meanwhile wait for it."""
        fetch = Fetch(start, count, asyncio.get_running_loop().create_future(),
                       self._generation)
        for ci in range(start, start + count):
            self.inflight[ci] = fetch
        await self._fetch(fetch)

    async def _fetch(self, fetch: Fetch) -> None:
        """Read a fetch's clusters from the base, hand them to its readers and
        queue them to be stored."""
        cs = self.cs
        off = fetch.start * cs
        n = min(fetch.count * cs, self.size - off)
        fut = fetch.future
        assert fut is not None
        try:
            version = self.base_version
            observed = version.current if version is not None else 0
            # The cheap look of the read path (a file's fstat at most every
            # 200 us), not one per fetch.
            if version is not None and version.poll():
                await self._report_change(version, observed)
                fetch.generation, version = self._generation, self.base_version
                observed = version.current if version is not None else 0
            try:
                data = await self.store.read_below(off, n)
            except StaleBaseError:
                if version is None:
                    raise
                # The source saw a new version (ETag) in the middle of reading.
                await self._report_change(version, observed)
                fetch.generation = self._generation
                data = await self.store.read_below(off, n)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # waiters re-raise it; don't log it as unretrieved
            forget(self.inflight, fetch)
            raise
        self._fetched(fetch, data)
        fut.set_result(data)

    def _fetched(self, fetch: Fetch, data: bytes) -> None:
        """A fetch's bytes arrived: count them, record them in the profile and
        queue them to be stored (they stay in ``inflight`` until then)."""
        fetch.data = data
        self.counters.bytes_from_base += len(data)
        self.recorder.record(fetch.start, fetch.count, self.ext.quota // self.cs)
        self.storer.queue(fetch)  # (a fetch from before a reset is never stored)

    # -- a changing base (sources/version.py) ----------------------------------------

    def _watch_base(self) -> None:
        """Hear of changes of the base's source from now on (and no longer of
        the one read before, if the base was reopened)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.base_version = self.base.source_version()
        self._unsubscribe = (self.base_version.subscribe(self)
                             if self.base_version is not None else None)

    async def _report_change(self, version: BaseVersion, observed: int) -> None:
        """A detector saw the base change since ``observed``: the watcher
        handles it once for every layer over the source (this one included);
        then a refusing cache refuses."""
        await version.changed(observed)
        if self._refusal is not None:
            raise StaleBaseError(self._refusal)

    async def base_stale(self, version: BaseVersion) -> None:
        """The base changed: refuse from now on, or drop everything (readers
        wait until the base is adopted)."""
        if self._refusal is not None or self._resetting is not None:
            return
        if self.ext.on_stale == cache_ext.ON_STALE_REFUSE:
            self._refusal = (f"{self.name}: the base changed while serving; "
                             "refusing (on_stale=refuse)")
            log.error("%s", self._refusal)
            return
        log.warning("%s: the base changed while serving; dropping the cache", self.name)
        self._resetting = asyncio.get_running_loop().create_future()
        await self._drop_all()
        self.counters.resets += 1

    async def base_adopted(self, version: BaseVersion) -> None:
        """The base's source serves its new version: follow it, record its
        identity, and let readers go on."""
        resetting = self._resetting
        if resetting is None:
            return  # refusing
        try:
            if not self.base.follows_new_versions:
                await self._reopen_base()
            self.ext.identity = await self.base_identity()
            await self._persist_extension()
        finally:
            self._generation += 1  # reads that overlapped the reset read again
            self._resetting = None
            resetting.set_result(None)

    async def _reopen_base(self) -> None:
        # A qcow2 base keeps what it parsed of the old version: open it again.
        if self.reopen_base is None:
            self._refusal = f"{self.name}: the base changed and cannot be reopened"
            raise StaleBaseError(self._refusal)
        old = self.store.swap_base(await self.reopen_base())
        self._watch_base()
        if old is not None:
            # Fetches started before may still be reading the old base.
            earlier = [t for t in self._tasks if t is not asyncio.current_task()]
            self._background(self._release_after(old, earlier), "release of the old base")

    async def _release_after(self, ref: NodeRef, tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await ref.release()

    # -- persistence ------------------------------------------------------------------

    def _background(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def _flush_if_open(self) -> None:
        if not self.store.closed:
            await self.flush()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Readers of a failed fetch got the error through their futures;
            # the operator sees it here (a store, flush or version check that
            # failed would otherwise go unnoticed).
            self.counters.background_errors += 1
            log.warning("%s: background %s failed: %s", self.name, task.get_name(),
                        task.exception())

    def _schedule_flush(self) -> None:
        """Schedule a flush (counters, stored clusters) about a second from now."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(
                self._flush_later(), name="flush")
            self._flush_task.add_done_callback(self._task_done)

    async def _flush_later(self) -> None:
        await asyncio.sleep(max(self._last_flush + _FLUSH_INTERVAL - time.monotonic(), 0))
        if not self.store.closed:
            await self.flush()

    async def _persist_extension(self) -> None:
        """Write the extension (counters, identity) and the consistency bit."""
        self._last_flush = time.monotonic()
        ext = self.ext
        self.counters.save_into(ext)
        ext.used_bytes = self.quota.used_bytes()
        try:
            await self.store.save_records({EXT_CACHE: ext.encode()}, self.recorder.take())
        except OSError as e:
            log.warning("%s: could not save cache counters: %s", self.name, e)

    def lower(self) -> list[BlockLayer]:
        return [self.base]

    def metrics(self) -> dict[str, Any]:
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters and of the cache's state right now."""
        out = self.counters.snapshot(self.ext, used_bytes=self.quota.used_bytes(),
                                     cached_clusters=len(self.quota),
                                     cluster_size=self.cs,
                                     fetches_in_flight=len(self.inflight))
        if self.base_version is not None:
            # A version check of the base that failed is background work too.
            out["background_errors"] += self.base_version.failed_checks
        out.update(self.base.metrics())  # the base's source counters, if remote
        return out

    # -- what a prefetcher may ask and do (cache_profile.PrefetchTarget) -------------

    def holds(self, ci: int) -> bool:
        """Whether a cluster is cached or being fetched."""
        return ci in self.quota.held or ci in self.inflight

    def room(self) -> int:
        """Clusters a prefetch may still store: it never evicts, so up to the
        quota (stop) or the high watermark (lru)."""
        return self.quota.room_without_evicting()

    def reads_served(self) -> int:
        """Reads served so far, hits and misses (it moves while guests read)."""
        return self.counters.reads()

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
                await self.storer.landed()  # what it kept counts as prefetched
            finally:
                self._prefetch_inflight -= n
            got = min(n * self.cs, self.size - first * self.cs)
            fetched += got
            self.recorder.prefetched_run(
                got, [ci for ci in range(first, first + n) if ci in self.quota.held])
        return fetched


def caches_in(layer: BlockLayer) -> list[CacheLayer]:
    """The cache layers in a stack (an export may be an overlay over a cache)."""
    return [node for node in chain_of(layer) if isinstance(node, CacheLayer)]


__all__ = ["BootcacheError", "CacheLayer", "caches_in", "read_extension"]
