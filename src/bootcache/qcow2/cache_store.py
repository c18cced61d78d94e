"""A qcow2 image as a cache's cluster store (block/store.py's CacheStore).

Held clusters are the image's data clusters; a missing cluster is an
unallocated one, which reads through to the backing file (the base), so
QEMU reading the image sees the base wherever the cache holds nothing. The
cache's records are header extensions (docs/spec/cache-image.md), written
with the cache autoclear bit through the one header writer.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

from bootcache.block.graph import NodeRef
from bootcache.block.layer import BlockLayer, Extent
from bootcache.block.store import Run
from bootcache.errors import ImageFormatError
from bootcache.qcow2 import profile_ext
from bootcache.qcow2.check import check_image
from bootcache.qcow2.clustermap import DATA, UNALLOC, ZERO
from bootcache.qcow2.format import AUTOCLEAR_CACHE
from bootcache.qcow2.image import Qcow2Image

log = logging.getLogger("bootcache.cache")


class Qcow2CacheStore:
    """Implements :class:`~bootcache.block.store.CacheStore` over a writable image."""

    def __init__(self, img: Qcow2Image) -> None:
        if img.backing is None:
            raise ImageFormatError(f"{img.name}: a cache image needs its base (backing file)")
        self.img = img
        self.name = img.name
        # A synchronous read of the file, when it is local (the hot hit path).
        self._pread_now = getattr(img.source, "pread_now", None)
        # The map's lookup itself (the image's map is never replaced): one
        # call less per hit.
        self._data_host = img.map.data_host

    @property
    def cluster_size(self) -> int:
        return self.img.cs

    @property
    def size(self) -> int:
        return self.img.size

    @property
    def closed(self) -> bool:
        return self.img.closed

    # -- the base below ------------------------------------------------------------

    @property
    def base(self) -> BlockLayer:
        base = self.img.backing
        assert base is not None
        return base

    def swap_base(self, ref: NodeRef) -> NodeRef | None:
        return self.img.attach_backing(ref)

    async def read_below(self, offset: int, length: int) -> bytes:
        return await self.img.read_below(offset, length)

    def read_below_nowait(self, offset: int, length: int) -> bytes | None:
        return self.img.read_below_nowait(offset, length)

    # -- lookups and reads ---------------------------------------------------------

    def read_held_nowait(self, offset: int, length: int) -> bytes | None:
        if self._pread_now is None:
            return None
        host = self._data_host(offset, length)
        if host < 0:
            return None
        data: bytes = self._pread_now(host, length)
        return data

    def pinned(self) -> AbstractContextManager[None]:
        return self.img.reading()

    async def lookup(self, offset: int, length: int) -> list[Run]:
        # Zero and compressed clusters (a foreign writer's, or a pulled image's)
        # are held too: they are the image's content, read by read_run.
        return [(run[0] != UNALLOC, run[1], run[2], run)
                for run in await self.img.map_range(offset, length)]

    def lookup_nowait(self, offset: int, length: int) -> list[Run] | None:
        runs = self.img.map_range_nowait(offset, length)
        if runs is None:
            return None
        return [(run[0] != UNALLOC, run[1], run[2], run) for run in runs]

    def read_run_nowait(self, run: Run) -> bytes | None:
        mapping = run[3]
        if mapping[0] == DATA and self._pread_now is not None:
            data: bytes = self._pread_now(mapping[3], mapping[2])
            return data
        if mapping[0] == ZERO:
            return bytes(mapping[2])
        return None

    async def read_run(self, run: Run) -> bytes:
        mapping = run[3]
        if mapping[0] == DATA:
            return await self.img.source.pread(mapping[3], mapping[2])
        return await self.img.read_mapped(mapping)

    async def read(self, offset: int, length: int) -> bytes:
        return await self.img.pread(offset, length)

    async def held_clusters(self) -> list[int]:
        return await self.img.allocated_clusters()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.img.block_status(offset, length)

    # -- changing what is held -----------------------------------------------------

    async def store(self, first: int, data: bytes | memoryview) -> None:
        await self.img.pwrite(first * self.img.cs, data)

    async def store_runs(self, runs: list[tuple[int, bytes | memoryview]]) -> None:
        await self.img.store_clusters(runs)

    async def unmap(self, clusters: list[int]) -> None:
        await self.img.unmap_clusters(clusters)

    async def unmap_all(self) -> int:
        return await self.img.unmap_all()

    async def drop_foreign_zeros(self) -> int:
        zeros = await self.img.allocated_clusters(zero=True)
        if zeros:
            await self.img.unmap_clusters(zeros)
        return len(zeros)

    async def repair_leaks(self) -> tuple[int, int]:
        result = await check_image(self.img, repair="leaks")
        return result.leaks_fixed, result.corruptions

    # -- records -------------------------------------------------------------------

    def record(self, kind: int) -> bytes | None:
        ext = self.img.header.find_extension(kind)
        return ext.data if ext is not None else None

    def marked_consistent(self) -> bool:
        return bool(self.img.header.autoclear_features & AUTOCLEAR_CACHE)

    async def save_records(self, records: dict[int, bytes],
                           profile: profile_ext.Profile | None = None) -> None:
        def fit_profile(header: Any) -> None:
            if profile is not None:
                profile_ext.store_profile(header, profile)

        await self.img.update_header(dict(records), autoclear_set=AUTOCLEAR_CACHE,
                                     adjust=fit_profile)

    def read_profile(self) -> profile_ext.Profile | None:
        """The boot profile the image keeps (ImageFormatError if malformed)."""
        return profile_ext.read_profile(self.img.header)

    def drop_clean_metadata(self) -> None:
        self.img.drop_clean_metadata()

    def identity(self) -> dict[str, Any]:
        return self.img.identity()

    async def flush(self) -> None:
        await self.img.flush()

    async def close(self) -> None:
        await self.img.close()
