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
from typing import Any

from bootcache.errors import BootcacheError, ImageFormatError, StaleBaseError
from bootcache.layers.base import BlockLayer, Extent
from bootcache.qcow2 import cache_ext
from bootcache.qcow2.cache_ext import CacheExtension
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import DATA, UNALLOC, Qcow2Image

log = logging.getLogger("bootcache.cache")

_SAMPLES = 8
_SAMPLE_BYTES = 4096
_FLUSH_INTERVAL = 1.0
_ENOSPC_RETRY = 5.0


def read_extension(img: Qcow2Image) -> CacheExtension | None:
    """The cache extension of an image, or None for an ordinary qcow2."""
    ext = img.header.find_extension(EXT_CACHE)
    return CacheExtension.decode(ext.data) if ext else None


class CacheLayer(BlockLayer):
    """A read-only view of a base, filling a cache image on the way."""

    def __init__(self, img: Qcow2Image, ext: CacheExtension) -> None:
        if img.backing is None:
            raise ImageFormatError(f"{img.name}: a cache image needs its base (backing file)")
        self.img = img
        self.base: BlockLayer = img.backing
        self.ext = ext
        self.name = img.name
        self.cs = img.cs
        #: Cached guest clusters, least recently used first.
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.inflight: dict[int, asyncio.Future[bytes]] = {}
        self._dirty_counters = False
        self._last_flush = time.monotonic()
        self._store_paused_until = 0.0

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(cls, img: Qcow2Image) -> CacheLayer:
        """Wrap an image opened writable (keeping the cache autoclear bit)."""
        ext = read_extension(img)
        if ext is None:
            raise ImageFormatError(f"{img.name}: not a cache image")
        layer = cls(img, ext)
        for ci in await img.allocated_clusters():
            layer.cached[ci] = None
        consistent = bool(img.header.autoclear_features & AUTOCLEAR_CACHE)
        await layer._check_base(consistent)
        return layer

    async def _check_base(self, consistent: bool) -> None:
        """Refuse or reset on a changed base; revalidate after a foreign writer."""
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
        self.ext.used_bytes = len(self.cached) * self.cs
        self.img.header.autoclear_features |= AUTOCLEAR_CACHE
        await self._persist_extension()

    async def base_identity(self) -> dict[str, Any]:
        """Identity of the base: its source's facts plus a hash of sampled blocks."""
        ident = dict(self.base.identity())
        size = self.base.size
        h = hashlib.sha256(str(size).encode())
        step = max(size // _SAMPLES, 1)
        for off in range(0, size, step):
            h.update(await self.base.pread(off, min(_SAMPLE_BYTES, size - off)))
        ident["virtual_size"] = size
        ident["sample_sha256"] = h.hexdigest()
        return ident

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
        if self.cached:
            await self.img.unmap_clusters(list(self.cached))
            self.cached.clear()
            await self.img.flush()

    # -- BlockLayer -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.img.size

    @property
    def read_only(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return self.img.identity()

    async def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        img = self.img
        runs = await img.map_range(offset, length)
        ext = self.ext
        if len(runs) == 1 and runs[0][0] == DATA:
            # Fast path: a pure hit.
            ext.hits += 1
            ext.bytes_from_cache += length
            self._dirty_counters = True
            if ext.policy == cache_ext.POLICY_LRU:
                self._touch(offset, length)
            return await img.source.pread(runs[0][3], length)
        parts = []
        missed = False
        for run in runs:
            kind, guest, n, _ = run
            if kind == UNALLOC:
                missed = True
                parts.append(await self._miss(guest, n))
            else:
                ext.bytes_from_cache += n
                parts.append(await img._read_run(run))
        if missed:
            ext.misses += 1
        else:
            ext.hits += 1
        if ext.policy == cache_ext.POLICY_LRU:
            self._touch(offset, length)
        self._dirty_counters = True
        await self._maybe_flush()
        return b"".join(parts)

    async def prefetch(self, offset: int, length: int) -> None:
        await self.pread(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.img.block_status(offset, length)

    async def flush(self) -> None:
        await self.img.flush()
        await self._persist_extension()

    async def close(self) -> None:
        try:
            if not self.img.closed:
                await self.flush()
        finally:
            await self.img.close()

    # -- misses ---------------------------------------------------------------------

    async def _miss(self, offset: int, length: int) -> bytes:
        """Bytes of a range the cache does not hold, fetching each cluster once."""
        cs = self.cs
        first, last = offset // cs, (offset + length - 1) // cs
        waits: dict[int, asyncio.Future[bytes]] = {}
        run_start: int | None = None
        fetches = []
        for ci in range(first, last + 2):
            fut = self.inflight.get(ci) if ci <= last else None
            if ci <= last and fut is None and ci not in self.cached:
                if run_start is None:
                    run_start = ci
                continue
            if run_start is not None:
                fetches.append((run_start, ci - run_start))
                run_start = None
            if fut is not None:
                waits[ci] = fut
        loop = asyncio.get_running_loop()
        for start, count in fetches:
            for ci in range(start, start + count):
                waits[ci] = self.inflight[ci] = loop.create_future()
        results = await asyncio.gather(*(self._fetch(s, c) for s, c in fetches),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        chunks = []
        for ci in range(first, last + 1):
            fut = waits.get(ci)
            data = await fut if fut is not None else await self._read_cached(ci)
            lo = max(offset, ci * cs) - ci * cs
            hi = min(offset + length, (ci + 1) * cs) - ci * cs
            chunks.append(data[lo:hi])
        return b"".join(chunks)

    async def _read_cached(self, ci: int) -> bytes:
        off = ci * self.cs
        return await self.img.pread(off, min(self.cs, self.size - off))

    async def _fetch(self, start: int, count: int) -> None:
        """Read clusters [start, start+count) from the base and store them."""
        cs = self.cs
        off = start * cs
        n = min(count * cs, self.size - off)
        futs = [self.inflight[ci] for ci in range(start, start + count)]
        try:
            await self._check_base_unchanged()
            data = await self.img.read_below(off, n)
        except BaseException as e:
            for ci, fut in zip(range(start, start + count), futs, strict=True):
                if not fut.done():
                    fut.set_exception(e)
                    fut.exception()  # waiters re-raise it; don't log it as unretrieved
                self.inflight.pop(ci, None)
            raise
        self.ext.bytes_from_base += n
        view = memoryview(data)
        for k, fut in enumerate(futs):
            fut.set_result(bytes(view[k * cs:(k + 1) * cs]))
        try:
            await self._store(start, data)
        finally:
            # Only now: until the store lands, newcomers must reuse these results.
            for ci in range(start, start + count):
                self.inflight.pop(ci, None)

    async def _check_base_unchanged(self) -> None:
        current = self.base.identity()
        recorded = self.ext.identity
        if any(recorded.get(k) != v for k, v in current.items()):
            # The base changed under us: cached clusters may be stale.
            if self.ext.on_stale == cache_ext.ON_STALE_REFUSE:
                raise StaleBaseError(f"{self.name}: the base changed while serving")
            log.warning("%s: the base changed while serving; dropping the cache", self.name)
            await self._drop_all()
            self.ext.resets += 1
            self.ext.identity = await self.base_identity()
            await self._persist_extension()

    # -- storing and the quota ---------------------------------------------------------

    async def _store(self, start: int, data: bytes) -> None:
        if time.monotonic() < self._store_paused_until:
            return
        cs, ext = self.cs, self.ext
        count = -(-len(data) // cs)
        if ext.policy == cache_ext.POLICY_LRU:
            high = ext.quota * ext.high_watermark // 100
            if (len(self.cached) + count) * cs > high:
                low = ext.quota * ext.low_watermark // 100
                keep = max(low // cs - count, 0)
                victims = [ci for ci in self.cached if ci not in self.inflight]
                await self._evict(victims[:max(len(self.cached) - keep, 0)])
        room = max(ext.quota // cs - len(self.cached), 0)
        count = min(count, room)
        if count <= 0:
            return
        try:
            await self.img.pwrite(start * cs, memoryview(data)[:count * cs])
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The read still succeeds from the base; try caching again later.
            self._store_paused_until = time.monotonic() + _ENOSPC_RETRY
            log.warning("%s: no space to cache (%s); serving from the base", self.name, e)
            return
        for ci in range(start, start + count):
            self.cached[ci] = None
        ext.clusters_stored += count
        ext.used_bytes = len(self.cached) * cs
        self._dirty_counters = True

    async def _evict(self, victims: list[int]) -> None:
        if not victims:
            return
        await self.img.unmap_clusters(victims)
        for ci in victims:
            self.cached.pop(ci, None)
        self.ext.evictions += len(victims)
        self.ext.used_bytes = len(self.cached) * self.cs
        await self.img.flush()  # frees (and hole punching) happen at flush

    def _touch(self, offset: int, length: int) -> None:
        cached = self.cached
        for ci in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            if ci in cached:
                cached.move_to_end(ci)

    # -- persistence ------------------------------------------------------------------

    async def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= _FLUSH_INTERVAL:
            await self.flush()

    async def _persist_extension(self) -> None:
        """Write the extension (counters, identity) and the consistency bit."""
        self._last_flush = time.monotonic()
        self.img.header.set_extension(EXT_CACHE, self.ext.encode())
        try:
            await self.img.rewrite_header()
        except OSError as e:
            log.warning("%s: could not save cache counters: %s", self.name, e)
        self._dirty_counters = False

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.ext.counters())
        out.update(quota=self.ext.quota, policy=cache_ext.POLICY_NAMES[self.ext.policy],
                   cached_clusters=len(self.cached), cluster_size=self.cs)
        return out


__all__ = ["BootcacheError", "CacheLayer", "read_extension"]
