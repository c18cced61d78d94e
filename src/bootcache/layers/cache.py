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
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from bootcache.block.graph import NodeRef
from bootcache.block.layer import NOWAIT_MAX, BlockLayer, Extent, chain_of
from bootcache.errors import BootcacheError, ImageCorruptError, ImageFormatError, StaleBaseError
from bootcache.layers.cache_profile import CacheProfileMixin
from bootcache.qcow2 import cache_ext, profile_ext
from bootcache.qcow2.cache_ext import CacheExtension
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import DATA, UNALLOC, Qcow2Image

log = logging.getLogger("bootcache.cache")

_SAMPLES = 8
_SAMPLE_BYTES = 4096
_FLUSH_INTERVAL = 1.0
_ENOSPC_RETRY = 5.0
_STORE_PIECE = 1 << 20
_FINGERPRINT_INTERVAL_NS = 200_000


def read_extension(img: Qcow2Image) -> CacheExtension | None:
    """The cache extension of an image, or None for an ordinary qcow2."""
    ext = img.header.find_extension(EXT_CACHE)
    return CacheExtension.decode(ext.data) if ext else None


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


class _Fetch:
    """One read of clusters [start, ...) from the base; its future is the bytes."""

    __slots__ = ("future", "start")

    def __init__(self, start: int, future: asyncio.Future[bytes]) -> None:
        self.start = start
        self.future = future


#: Where a piece of a miss comes from: a fetch (None: the cache, stored
#: meanwhile) and the piece's guest byte range [lo, hi).
_Segment = tuple[_Fetch | None, int, int]


class CacheLayer(CacheProfileMixin, BlockLayer):
    """A read-only view of a base, filling a cache image on the way."""

    self_writing = True

    def __init__(self, img: Qcow2Image, ext: CacheExtension) -> None:
        if img.backing is None:
            raise ImageFormatError(f"{img.name}: a cache image needs its base (backing file)")
        self.img = img
        self.ext = ext
        self.name = img.name
        self.cs = img.cs
        #: Cached guest clusters, least recently used first.
        self.cached: OrderedDict[int, None] = OrderedDict()
        #: Clusters being fetched from the base, each to the fetch bringing it.
        self.inflight: dict[int, _Fetch] = {}
        self._dirty_counters = False
        self._last_flush = time.monotonic()
        self._store_paused_until = 0.0
        #: Clusters promised to stores in progress.
        self._reserved = 0
        self._base_fp: object = None
        self._fp_checked = 0
        interval = self.base.version_check_interval()
        self._version_interval_ns = int(interval * 1e9) if interval else 0
        self._version_checked = time.monotonic_ns()
        #: Reopens the base when it changed in a way it cannot adopt (qcow2).
        self.reopen_base: Callable[[], Coroutine[Any, Any, NodeRef]] | None = None
        #: Clusters fetched beyond a miss, in the same request (0: none).
        self.readahead = 0
        #: Bumped when a reset of the cache begins and again when it ends: fetches
        #: from before must not be stored, and a base change observed before must
        #: not reset the cache a second time (see _base_changed).
        self._generation = 0
        #: Set while a reset runs: readers wait for it instead of detecting the
        #: same change again.
        self._resetting: asyncio.Future[None] | None = None
        #: Why this cache refuses to serve (on_stale=refuse), once it does.
        self._refusal: str | None = None
        #: Background work (stores, flushes, version checks) that failed.
        self.background_errors = 0
        #: Times the disk had no room for a store or flush (reads went on from
        #: the base; caching resumed after a pause).
        self.no_space = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # A synchronous read of the cache file, when it is a local file.
        self._pread_now: Callable[[int, int], bytes] | None = getattr(
            img.source, "pread_now", None)
        self._flush_task: asyncio.Task[None] | None = None
        self._init_profile()
        self._evict_flush: asyncio.Task[None] | None = None

    @property
    def base(self) -> BlockLayer:
        """The layer the cache copies from (its image's backing file)."""
        base = self.img.backing
        assert base is not None
        return base

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(cls, img: Qcow2Image) -> CacheLayer:
        """Wrap an image opened writable (keeping the cache autoclear bit)."""
        ext = read_extension(img)
        if ext is None:
            raise ImageFormatError(f"{img.name}: not a cache image")
        layer = cls(img, ext)
        layer._load_profile()
        await layer._reclaim_leaks()
        for ci in await img.allocated_clusters():
            layer.cached[ci] = None
        consistent = bool(img.header.autoclear_features & AUTOCLEAR_CACHE)
        await layer._check_base(consistent)
        # The checks above read metadata the first reads may never need: a
        # node holds many caches, most of them idle.
        img.drop_clean_metadata()
        return layer

    async def _reclaim_leaks(self) -> None:
        """Give back clusters a crash left allocated but unreferenced.

        A killed filler leaves its unflushed stores as leaks (never as wrong
        data); a cache is long-lived and refilled after every crash, so the
        owner repairs them at open rather than letting them pile up.
        """
        from bootcache.qcow2.check import check_image

        result = await check_image(self.img, repair="leaks")
        if result.leaks_fixed:
            log.warning("%s: reclaimed %d leaked clusters", self.name, result.leaks_fixed)
        if result.corruptions:
            raise ImageCorruptError(
                f"{self.name}: {result.corruptions} corruptions; run bootcache check -r all")

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
            log.warning("%s; dropping %d cached clusters", msg, len(self.cached))
            await self._drop_all()
            self.ext.resets += 1
        elif not consistent:
            # A writer that does not know the extension opened the image (it
            # cleared our autoclear bit): every cached cluster must be proven.
            await self._revalidate()
        self.ext.identity = current
        self._base_fp = self.base.fingerprint()
        self.ext.used_bytes = len(self.cached) * self.cs
        self.img.header.autoclear_features |= AUTOCLEAR_CACHE
        if self.ext.encode() != before:  # an unchanged image is not written at open
            await self._persist_extension()

    async def base_identity(self) -> dict[str, Any]:
        """Identity of the base: its source's facts plus a hash of sampled blocks."""
        return await base_identity(self.base)

    async def _revalidate(self) -> None:
        # Zero clusters are never written by a cache: they can only hide base data.
        zeros = await self.img.allocated_clusters(zero=True)
        if zeros:
            await self.img.unmap_clusters(zeros)
        bad = []
        for ci in list(self.cached):
            off = ci * self.cs
            n = min(self.cs, self.size - off)
            if await self.img.pread(off, n) != await self.img.read_below(off, n):
                bad.append(ci)
        log.warning("%s: revalidated %d cached clusters after a foreign writer, dropped %d",
                    self.name, len(self.cached), len(bad))
        if bad:
            await self._evict(bad)
            await self.img.flush()

    async def _drop_all(self) -> None:
        # Stores in progress see the new generation and stop; what they already
        # wrote is allocated by then, and unmapped here with the rest.
        self._generation += 1
        self.cached.clear()
        # Fetches in flight may bring old bytes: readers from now on must not
        # wait for them (their own readers still get them, and read again).
        self.inflight.clear()
        self.prefetched.clear()  # hits on refetched clusters are not prefetch hits
        if await self.img.unmap_all():
            await self.img.flush()
        self.cached.clear()

    # -- BlockLayer -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.img.size

    @property
    def read_only(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return self.img.identity()

    def content_version(self) -> int:
        # Bumped when a reset starts and when it ends.
        return self._generation

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        if (self._resetting is not None or self._refusal is not None or offset < 0
                or length > NOWAIT_MAX or offset + length > self.img.size):
            return None
        now = time.monotonic_ns()
        if self._version_interval_ns and now - self._version_checked >= self._version_interval_ns:
            self._version_checked = now
            self._background(self._check_version(), "version check")
        if now - self._fp_checked >= _FINGERPRINT_INTERVAL_NS:
            if self.base.fingerprint() != self._base_fp:
                return None  # the base changed: pread() deals with it
            self._fp_checked = now
        return self._hit_now(offset, length)

    def _hit_now(self, offset: int, length: int) -> bytes | None:
        """A hit on host-contiguous cached clusters, looked up and read without
        yielding (so no release can intervene between lookup and read)."""
        if self._pread_now is None:
            return None
        host = self.img.data_host(offset, length)
        if host < 0:
            return None
        ext = self.ext
        ext.hits += 1
        ext.bytes_from_cache += length
        if self.prefetched:
            self._count_prefetch_hit(offset, length)
        if ext.policy == cache_ext.POLICY_LRU:
            ci = offset // self.cs
            if (offset + length - 1) // self.cs != ci:
                self._touch(offset, length)
            elif ci in self.cached:
                self.cached.move_to_end(ci)
        return self._pread_now(host, length)

    async def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.img.size:
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
        now = time.monotonic_ns()
        if self._version_interval_ns and now - self._version_checked >= self._version_interval_ns:
            # Remote bases (HTTP ETag, S3): ask in the background every few
            # seconds, since a warm cache never fetches and so never sees a change.
            self._version_checked = now
            self._background(self._check_version(), "version check")
        if now - self._fp_checked >= _FINGERPRINT_INTERVAL_NS:
            # Checked on reads, hits included (a warm cache never misses, and
            # must still not serve bytes of a base that changed), but at most
            # every 200 us: under load the check would cost more than the read.
            self._fp_checked = now
            generation = self._generation
            if self.base.fingerprint() != self._base_fp:
                await self._base_changed(generation)
        if length <= NOWAIT_MAX:
            # The hot path: a hit on host-contiguous clusters, one pread.
            data = self._hit_now(offset, length)
            if data is not None:
                return data
        img = self.img
        # While this read maps and reads cached runs, the clusters it mapped are
        # not released for reuse. Misses only start their fetches in there: the
        # base is waited for outside, so frees never wait on a remote base.
        parts: list[bytes | list[_Segment]] = []
        missed = False
        with img.reading():
            runs = await img.map_range(offset, length)
            ext = self.ext
            if len(runs) == 1 and runs[0][0] == DATA:
                # Fast path: a pure hit.
                ext.hits += 1
                ext.bytes_from_cache += length
                self._dirty_counters = True
                if self.prefetched:
                    self._count_prefetch_hit(offset, length)
                if ext.policy == cache_ext.POLICY_LRU:
                    self._touch(offset, length)
                return await img.source.pread(runs[0][3], length)
            for run in runs:
                kind, guest, n, _ = run
                if kind == UNALLOC:
                    missed = True
                    parts.append(self._start_miss(guest, n))
                else:
                    ext.bytes_from_cache += n
                    parts.append(await img._read_run(run))
        pieces: list[bytes | memoryview] = []
        for part in parts:
            if isinstance(part, list):
                pieces.extend(await self._collect(part))
            else:
                pieces.append(part)
        if missed:
            ext.misses += 1
        else:
            ext.hits += 1
        if ext.policy == cache_ext.POLICY_LRU:
            self._touch(offset, length)
        self._dirty_counters = True
        await self._maybe_flush()
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]  # a miss that is exactly one fetch: no copy at all
        # The one copy of a miss: fetched buffers are sliced as memoryviews.
        return b"".join(pieces)

    async def settle(self) -> None:
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
        return self.img

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.img.block_status(offset, length)

    async def flush(self) -> None:
        try:
            await self.img.flush()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # What is on disk stays consistent; unflushed stores are retried later
            # or lost (leaked clusters), never wrong.
            self._store_paused_until = time.monotonic() + _ENOSPC_RETRY
            self.no_space += 1
            log.warning("%s: no space to flush the cache (%s)", self.name, e)
            return
        await self._persist_extension()

    async def close(self) -> None:
        try:
            for hook in self.on_close:
                await hook()  # a prefetch stops before the stores settle
            # Let stores in progress land (they are part of what close persists).
            await self.settle()
            if self._flush_task is not None:
                self._flush_task.cancel()
            if not self.img.closed:
                await self.flush()
        finally:
            try:
                await self.img.close()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("%s: closed without flushing (%s)", self.name, e)

    # -- misses ---------------------------------------------------------------------

    def _start_miss(self, offset: int, length: int) -> list[_Segment]:
        """Plan the bytes of a range the cache does not hold, starting a fetch
        for each run of clusters neither held nor coming (single flight), and
        return where each piece will come from. Never waits."""
        cs = self.cs
        first, last = offset // cs, (offset + length - 1) // cs
        inflight, cached = self.inflight, self.cached
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
            start, count = fetches[-1]
            stop = min(last + 1 + self.readahead, -(-self.size // cs))
            k = last + 1
            while k < stop and k not in cached and k not in inflight:
                k += 1
            fetches[-1] = (start, k - start)
        loop = asyncio.get_running_loop()
        for start, count in fetches:
            fetch = _Fetch(start, loop.create_future())
            for ci in range(start, start + count):
                inflight[ci] = fetch
            # The fetch stores in the background: the reader waits for the
            # bytes (the fetch's future), never for the cache write.
            self._background(self._fetch(fetch, count), "fetch")
        segments: list[_Segment] = []
        end = offset + length
        for ci in range(first, last + 1):
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
                out.append(await self.img.pread(lo, hi - lo))
                continue
            data = await fetch.future
            base = fetch.start * cs
            if lo == base and hi - lo == len(data):
                out.append(data)
            else:
                out.append(memoryview(data)[lo - base:hi - base])
        return out

    async def _fetch_run(self, start: int, count: int) -> None:
        """Fetch and store clusters [start, start+count), which are neither
        cached nor in flight; readers asking for them meanwhile wait for it."""
        fetch = _Fetch(start, asyncio.get_running_loop().create_future())
        for ci in range(start, start + count):
            self.inflight[ci] = fetch
        await self._fetch(fetch, count)

    async def _fetch(self, fetch: _Fetch, count: int) -> None:
        """Read clusters [start, start+count) from the base and store them."""
        cs = self.cs
        start = fetch.start
        off = start * cs
        n = min(count * cs, self.size - off)
        fut = fetch.future
        try:
            generation = self._generation
            if self.base.fingerprint() != self._base_fp:
                await self._base_changed(generation)
                generation = self._generation
            try:
                data = await self.img.read_below(off, n)
            except StaleBaseError:
                # The source saw a new version (ETag) in the middle of reading.
                await self._base_changed(generation)
                generation = self._generation
                data = await self.img.read_below(off, n)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # waiters re-raise it; don't log it as unretrieved
            self._forget(fetch, count)
            raise
        self.ext.bytes_from_base += n
        self._record_profile(start, count)
        fut.set_result(data)
        try:
            if generation == self._generation:
                await self._store(start, data, generation)
        finally:
            # Only now: until the store lands, newcomers must reuse this result.
            self._forget(fetch, count)

    def _forget(self, fetch: _Fetch, count: int) -> None:
        inflight = self.inflight
        for ci in range(fetch.start, fetch.start + count):
            if inflight.get(ci) is fetch:
                del inflight[ci]

    async def _check_version(self) -> None:
        generation = self._generation
        if await self.base.version_changed():
            await self._base_changed(generation)

    async def _base_changed(self, observed: int) -> None:
        """The base changed while serving: refuse, or drop everything once.

        ``observed`` is the generation current when the caller began looking
        at the base (a version check, a fetch, a fingerprint). Several
        detectors may see one change at about the same time; the first resets
        the cache and adopts the base's newest version, and every detection
        that began before that reset ended is covered by it. So one change of
        the base gives exactly one reset, whatever noticed it.
        """
        while self._resetting is not None:
            await asyncio.shield(self._resetting)
        if self._generation != observed:
            return  # a reset that began after this observation adopted the change
        if self.ext.on_stale == cache_ext.ON_STALE_REFUSE:
            if self._refusal is None:
                self._refusal = (f"{self.name}: the base changed while serving; "
                                 "refusing (on_stale=refuse)")
                log.error("%s", self._refusal)
            raise StaleBaseError(self._refusal)
        self._resetting = asyncio.get_running_loop().create_future()
        try:
            await self._reset_to_new_base()
        finally:
            self._generation += 1  # detections made during the reset are covered too
            self._resetting.set_result(None)
            self._resetting = None

    async def _reset_to_new_base(self) -> None:
        log.warning("%s: the base changed while serving; dropping the cache", self.name)
        await self._drop_all()
        self.ext.resets += 1
        try:
            await self.base.refresh_identity()
        except StaleBaseError:
            if self.reopen_base is None:
                raise
            # A qcow2 base cannot adopt a new version in place: open it again.
            old = self.img.attach_backing(await self.reopen_base())
            if old is not None:
                # Fetches started before may still be reading the old base.
                earlier = [t for t in self._tasks if t is not asyncio.current_task()]
                self._background(self._release_after(old, earlier), "release of the old base")
        self._base_fp = self.base.fingerprint()
        self.ext.identity = await self.base_identity()
        await self._persist_extension()

    async def _release_after(self, ref: NodeRef, tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await ref.release()

    # -- storing and the quota ---------------------------------------------------------

    def _used(self) -> int:
        """Clusters held or promised to stores in progress (what the quota counts)."""
        return len(self.cached) + self._reserved

    async def _store(self, start: int, data: bytes, generation: int) -> None:
        if time.monotonic() < self._store_paused_until:
            return
        cs, ext = self.cs, self.ext
        count = -(-len(data) // cs)
        # Decide (evictions, room) and reserve before any await, so that
        # concurrent stores can never take the cache past its quota together.
        victims: list[int] = []
        if ext.policy == cache_ext.POLICY_LRU:
            high = ext.quota * ext.high_watermark // 100
            if (self._used() + count) * cs > high:
                keep = max(ext.quota * ext.low_watermark // 100 // cs - count, 0)
                excess = self._used() - keep
                victims = self._oldest(excess)
                for ci in victims:
                    del self.cached[ci]
        count = max(min(count, ext.quota // cs - self._used()), 0)
        self._reserved += count
        stored = 0
        try:
            if victims:
                await self._evict(victims)
            if count:
                stored = await self._store_pieces(start, memoryview(data), count, generation)
        finally:
            self._reserved -= count - stored  # stored clusters already moved to cached

    async def _store_pieces(self, start: int, view: memoryview, count: int,
                            generation: int) -> int:
        """Write ``count`` clusters in pieces, so that a disk filling up keeps
        what fitted; when a piece does not fit, go on cluster by cluster.
        Returns how many were stored."""
        cs, ext = self.cs, self.ext
        step = max(_STORE_PIECE // cs, 1)
        first = start
        while first < start + count:
            if generation != self._generation:
                # The cache was dropped (maybe while evictions made room): a
                # write queued behind the reset's unmap would map old bytes.
                break
            n = min(step, start + count - first)
            try:
                await self.img.pwrite(first * cs, view[(first - start) * cs:
                                                       (first - start + n) * cs])
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if step > 1:
                    step = 1
                    continue
                # The read still succeeds from the base; try caching again later.
                self._store_paused_until = time.monotonic() + _ENOSPC_RETRY
                self.no_space += 1
                log.warning("%s: no space to cache (%s); serving from the base, caching "
                            "again in %.0f s", self.name, e, _ENOSPC_RETRY)
                break
            if generation != self._generation:
                break  # the cache was dropped meanwhile: this piece is being unmapped
            for ci in range(first, first + n):
                self.cached[ci] = None
            self._reserved -= n
            ext.clusters_stored += n
            ext.used_bytes = len(self.cached) * cs
            self._dirty_counters = True
            first += n
        return first - start

    def _oldest(self, count: int) -> list[int]:
        """Up to ``count`` least recently used clusters not being fetched: walks
        the LRU order only as far as it must, not the whole cache."""
        out: list[int] = []
        if count <= 0:
            return out
        inflight = self.inflight
        for ci in self.cached:
            if ci not in inflight:
                out.append(ci)
                if len(out) == count:
                    break
        return out

    async def _evict(self, victims: list[int]) -> None:
        """Make clusters unallocated again (the caller already forgot them)."""
        if not victims:
            return
        for ci in victims:
            self.cached.pop(ci, None)
        await self.img.unmap_clusters(victims)
        self.ext.evictions += len(victims)
        self.ext.used_bytes = len(self.cached) * self.cs
        # Frees (and hole punching) happen at a flush: start one now, in the
        # background, so the store that evicted does not wait on its syncs.
        if self._evict_flush is None or self._evict_flush.done():
            self._evict_flush = asyncio.get_running_loop().create_task(
                self._flush_if_open(), name="flush after eviction")
            self._tasks.add(self._evict_flush)
            self._evict_flush.add_done_callback(self._task_done)

    async def _flush_if_open(self) -> None:
        if not self.img.closed:
            await self.flush()

    def _touch(self, offset: int, length: int) -> None:
        cached = self.cached
        for ci in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            if ci in cached:
                cached.move_to_end(ci)

    # -- persistence ------------------------------------------------------------------

    def _background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Readers of a failed fetch got the error through their futures;
            # the operator sees it here (a store, flush or version check that
            # failed would otherwise go unnoticed).
            self.background_errors += 1
            log.warning("%s: background %s failed: %s", self.name, task.get_name(),
                        task.exception())

    async def _maybe_flush(self) -> None:
        """Schedule a flush (counters, stored clusters) about a second from now."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(
                self._flush_later(), name="flush")
            self._flush_task.add_done_callback(self._task_done)

    async def _flush_later(self) -> None:
        await asyncio.sleep(max(self._last_flush + _FLUSH_INTERVAL - time.monotonic(), 0))
        if not self.img.closed:
            await self.flush()

    async def _persist_extension(self) -> None:
        """Write the extension (counters, identity) and the consistency bit."""
        self._last_flush = time.monotonic()
        self.img.header.set_extension(EXT_CACHE, self.ext.encode())
        if self._profile_dirty and self.profile is not None:
            profile_ext.store_profile(self.img.header, self.profile)
            self._profile_dirty = False
        try:
            await self.img.rewrite_header()
        except OSError as e:
            log.warning("%s: could not save cache counters: %s", self.name, e)
        self._dirty_counters = False

    def lower(self) -> list[BlockLayer]:
        return [self.base]

    def metrics(self) -> dict[str, Any]:
        return self.stats()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.ext.counters())
        out.update(quota=self.ext.quota, policy=cache_ext.POLICY_NAMES[self.ext.policy],
                   cached_clusters=len(self.cached), cluster_size=self.cs,
                   background_errors=self.background_errors, no_space=self.no_space,
                   fetches_in_flight=len(self.inflight), prefetched_bytes=self.prefetched_bytes,
                   prefetch_hits=self.prefetch_hits)
        out.update(self.base.metrics())  # the base's source counters, if remote
        return out


def caches_in(layer: BlockLayer) -> list[CacheLayer]:
    """The cache layers in a stack (an export may be an overlay over a cache)."""
    return [node for node in chain_of(layer) if isinstance(node, CacheLayer)]


__all__ = ["BootcacheError", "CacheLayer", "caches_in", "read_extension"]
