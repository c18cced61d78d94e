"""The qcow2 engine as a cache store (block/store.py, qcow2/cache_store.py).

The contract the cache layer relies on, with QEMU as the oracle for what
the store leaves on disk: what it holds is what ``qemu-img map`` shows in
the image, what it does not hold reads through to the base, its records are
header extensions ``qemu-img check`` accepts, and a pinned lookup keeps its
clusters readable while they are unmapped and their space reused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bootcache.layers.chain import ChainPolicy, open_layer
from bootcache.qcow2.cache_ext import CacheExtension
from bootcache.qcow2.cache_store import Qcow2CacheStore
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import Qcow2Image

from .conftest import (
    CLUSTER,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_extension_fields,
    cached_clusters,
    create_cache,
    header_facts,
    make_base,
    qemu_convert_raw,
    qemu_io,
)

SIZE = 1 * MiB


async def open_store(cache: Path) -> Qcow2CacheStore:
    """The cache image as a plain writable qcow2 (not a cache layer), as a store."""
    img = await open_layer(str(cache), writable=True, keep_autoclear=AUTOCLEAR_CACHE,
                           policy=ChainPolicy(activate_caches=False))
    assert isinstance(img, Qcow2Image)
    return Qcow2CacheStore(img)


def test_store_lookup_unmap_and_records(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", SIZE, seed=61)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="10M")

    def cl(ci: int, n: int = 1) -> bytes:
        return base[ci * CLUSTER:(ci + n) * CLUSTER]

    async def go() -> None:
        store = await open_store(cache)
        try:
            assert store.cluster_size == CLUSTER and store.size == SIZE
            assert await store.held_clusters() == []
            assert [r[:3] for r in await store.lookup(0, SIZE)] == [(False, 0, SIZE)]
            await store.store(2, cl(2, 3))
            await store.store(7, await store.read_below(7 * CLUSTER, CLUSTER))
            assert await store.held_clusters() == [2, 3, 4, 7]
            runs = await store.lookup(CLUSTER, 7 * CLUSTER)
            assert [r[:3] for r in runs] == [
                (False, CLUSTER, CLUSTER), (True, 2 * CLUSTER, 3 * CLUSTER),
                (False, 5 * CLUSTER, 2 * CLUSTER), (True, 7 * CLUSTER, CLUSTER)]
            with store.pinned():
                assert await store.read_run(runs[1]) == cl(2, 3)
            # The hot path: held, host-contiguous, its L2 table in memory.
            assert store.read_held_nowait(2 * CLUSTER + 100, 2 * CLUSTER) == \
                base[2 * CLUSTER + 100:4 * CLUSTER + 100]
            assert store.read_held_nowait(0, CLUSTER) is None
            await store.unmap([3])
            assert await store.held_clusters() == [2, 4, 7]
            assert await store.read(0, SIZE) == base  # held or not, the disk's bytes
            ext = CacheExtension.decode(store.record(EXT_CACHE) or b"")
            ext.hits, ext.used_bytes = 5, 3 * CLUSTER
            await store.save_records({EXT_CACHE: ext.encode()})
            assert store.marked_consistent()
        finally:
            await store.close()

    asyncio.run(go())
    assert_qemu_check(cache)
    assert cached_clusters(cache) == {2, 4, 7}
    assert_bytes(qemu_convert_raw(cache), base, "QEMU reading the store's image")
    fields = cache_extension_fields(cache)
    assert fields is not None and fields["hits"] == 5 and fields["used_bytes"] == 3 * CLUSTER
    assert header_facts(cache)["autoclear"] & AUTOCLEAR_CACHE

    # A foreign writer's zero cluster (it would hide the base) is dropped.
    qemu_io(cache, f"write -z {5 * CLUSTER} {CLUSTER}")

    async def zeros() -> int:
        store = await open_store(cache)
        try:
            dropped = await store.drop_foreign_zeros()
            assert await store.read(5 * CLUSTER, CLUSTER) == cl(5)
            return dropped
        finally:
            await store.close()

    assert asyncio.run(zeros()) == 1
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), base, "after the zero cluster was dropped")


def test_pinned_clusters_survive_unmap_and_reuse(tmp_path: Path) -> None:
    """A reader's lookup pins what it found: unmapping a cluster and storing
    another (which reuses freed space once it may) never changes what the
    pinned run reads."""
    base = make_base(tmp_path / "base.raw", SIZE, seed=62)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="10M")

    async def go() -> None:
        store = await open_store(cache)
        try:
            await store.store(1, base[CLUSTER:2 * CLUSTER])
            await store.flush()
            with store.pinned():
                (run,) = await store.lookup(CLUSTER, CLUSTER)
                assert run[0]
                await store.unmap([1])
                await store.flush()  # frees what no pin holds: not this cluster
                await store.store(9, base[9 * CLUSTER:10 * CLUSTER])
                await store.flush()
                assert await store.read_run(run) == base[CLUSTER:2 * CLUSTER]
            # Unpinned, the space is released at the next flush and reused.
            await store.flush()
            await store.store(11, base[11 * CLUSTER:12 * CLUSTER])
            await store.flush()
            assert await store.held_clusters() == [9, 11]
        finally:
            await store.close()

    asyncio.run(go())
    assert_qemu_check(cache)
    assert cached_clusters(cache) == {9, 11}
    assert_bytes(qemu_convert_raw(cache), base, "after unmap and reuse")
