"""Acceptance 2 with the lru policy: the cache never holds more than its
quota (``qemu-img map``), every read stays correct, and the recently used
clusters are the ones kept.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

import bootcache
from bootcache.block.layer import BlockLayer
from bootcache.layers.chain import open_layer

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_extension_fields,
    cache_stats,
    cached_bytes,
    cached_clusters,
    create_cache,
    make_base,
    run,
)
from .test_cache_crash import crash_loop


def read_cluster(img: bootcache.Image, base: bytes, ci: int) -> None:
    off = ci * CLUSTER
    assert_bytes(img.read(off, CLUSTER), base[off:off + CLUSTER], f"cluster {ci}")


def test_lru_keeps_recently_used_clusters(tmp_path: Path) -> None:
    size = 4 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=33)
    cache = tmp_path / "cache.qcow2"
    quota = 16 * CLUSTER
    create_cache(cache, "base.raw", quota=quota, policy="lru")
    assert cache_extension_fields(cache)["policy"] == 1  # type: ignore[index]

    old = list(range(0, 12))      # first filled, then some of them used again
    again = [0, 1, 2, 3]          # used again: recent
    new = list(range(30, 42))     # forces evictions
    with bootcache.open(str(cache)) as img:
        for ci in old:
            read_cluster(img, base, ci)
        for ci in again:
            read_cluster(img, base, ci)
        for ci in new:
            read_cluster(img, base, ci)
            # Keep the re-used clusters warm as the new ones come in.
            assert_bytes(img.read(0, 4 * CLUSTER), base[:4 * CLUSTER], "hot range")
        stats = img.layer.stats()  # type: ignore[attr-defined]
    assert stats["evictions"] > 0, stats
    kept = cached_clusters(cache)
    assert cached_bytes(cache) <= quota
    assert set(again) <= kept, f"recently used clusters were evicted: kept {sorted(kept)}"
    assert set(new[-4:]) <= kept, f"the newest clusters are not kept: {sorted(kept)}"
    # Among clusters used only once, eviction goes oldest first: what is kept
    # of old[4:] (used in order 4, 5, ..., 11) is a most-recent suffix of it.
    survivors = [ci for ci in old[4:] if ci in kept]
    assert survivors == old[4:][len(old[4:]) - len(survivors):], \
        f"eviction is not least-recently-used first: kept {sorted(kept)}"
    assert_qemu_check(cache)

    # And everything still reads correctly.
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, size), base, "after evictions")


def test_lru_random_workload_bounded(tmp_path: Path, rng: random.Random) -> None:
    """Many times the quota flows through an lru cache: bounded use, holes punched."""
    size = 16 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=34)
    cache = tmp_path / "cache.qcow2"
    quota = 2 * MiB
    create_cache(cache, "base.raw", quota=quota, policy="lru", use_o=True,
                 extra_opts="cache_high_watermark=90,cache_low_watermark=50")
    fields = cache_extension_fields(cache)
    assert fields is not None and (fields["high"], fields["low"]) == (90, 50)
    for round_ in range(4):
        with bootcache.open(str(cache)) as img:
            for _ in range(60):
                n = rng.choice([1, 4096, CLUSTER, 2 * CLUSTER + 3, 512 * 1024])
                off = rng.randrange(0, size - n + 1)
                assert_bytes(img.read(off, n), base[off:off + n], f"round {round_} {off}+{n}")
        held = cached_bytes(cache)
        assert 0 < held <= quota, f"round {round_}: cache holds {held} > quota {quota}"
        assert_qemu_check(cache)
    stats = cache_stats(cache)
    assert stats["evictions"] > 0
    assert stats["used_bytes"] <= quota
    info = json.loads(run([QEMU_IMG, "info", "-U", "--output", "json", cache]).stdout)
    # Evicted clusters are punched out: the file's allocation stays near the quota.
    assert info["actual-size"] <= quota + 1 * MiB, info["actual-size"]


def test_lru_read_spanning_a_miss_and_cached_clusters(tmp_path: Path) -> None:
    """One read: a miss that forces evictions, then clusters that were cached.

    The miss must not evict (and reuse the host clusters of) clusters the same
    read is about to serve from the cache.
    """
    size = 2 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=35)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=1 * MiB, policy="lru")
    with bootcache.open(str(cache)) as img:
        for ci in range(20, 30):
            read_cluster(img, base, ci)
        assert_bytes(img.read(0, size), base, "a read over 20 cold then 10 cached clusters")
        assert_bytes(img.read(0, size), base, "the same read again")
    assert cached_bytes(cache) <= 1 * MiB
    assert_qemu_check(cache)
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, size), base, "after reopen")


def test_lru_concurrent_readers(tmp_path: Path) -> None:
    """16 tasks read random multi-cluster ranges through a small lru cache at once."""
    size = 4 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=36)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=8 * CLUSTER, policy="lru")

    async def reader(layer: BlockLayer, k: int) -> None:
        rng = random.Random(k)
        for _ in range(40):
            n = rng.choice([1, 4096, CLUSTER, 2 * CLUSTER + 1, 5 * CLUSTER])
            off = rng.randrange(0, size - n + 1)
            assert_bytes(await layer.pread(off, n), base[off:off + n], f"task {k} {off}+{n}")

    async def main() -> None:
        layer = await open_layer(str(cache))
        try:
            below = layer.base  # type: ignore[attr-defined]
            real = below.pread

            async def slow(offset: int, length: int) -> bytes:
                await asyncio.sleep(0.001)
                data: bytes = await real(offset, length)
                return data

            below.pread = slow
            below.pread_nowait = lambda offset, length: None  # fetches wait
            await asyncio.gather(*(reader(layer, k) for k in range(16)))
        finally:
            await layer.close()

    asyncio.run(main())
    assert cached_bytes(cache) <= 8 * CLUSTER
    assert_qemu_check(cache)


@pytest.mark.slow
def test_lru_sigkill_during_fills_and_evictions(tmp_path: Path) -> None:
    """Acceptance 7 with evictions: a small lru quota makes every child evict."""
    crash_loop(tmp_path, quota="2M", policy="lru", runs=20, budget=15)


def test_lru_quota_holds_under_concurrent_stores(tmp_path: Path) -> None:
    """Concurrent single-cluster misses with evictions in between: still within quota.

    Each read is one whole cluster, so a read is a pure hit or a pure miss;
    only the quota accounting is under test here.
    """
    size = 4 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=37)
    cache = tmp_path / "cache.qcow2"
    quota = 8 * CLUSTER
    create_cache(cache, "base.raw", quota=quota, policy="lru")
    rng = random.Random(37)

    async def one(layer: BlockLayer, ci: int) -> None:
        off = ci * CLUSTER
        assert_bytes(await layer.pread(off, CLUSTER), base[off:off + CLUSTER], f"cluster {ci}")

    async def main() -> int:
        layer = await open_layer(str(cache))
        try:
            below = layer.base  # type: ignore[attr-defined]
            real = below.pread

            async def slow(offset: int, length: int) -> bytes:
                await asyncio.sleep(rng.random() / 1000)
                data: bytes = await real(offset, length)
                return data

            below.pread = slow
            below.pread_nowait = lambda offset, length: None  # fetches wait
            most = 0
            for _ in range(20):
                await asyncio.gather(*(one(layer, rng.randrange(size // CLUSTER))
                                       for _ in range(32)))
                most = max(most, layer.stats()["cached_clusters"])  # type: ignore[attr-defined]
            return most
        finally:
            await layer.close()

    most = asyncio.run(main())
    assert most * CLUSTER <= quota, f"the cache held {most} clusters, quota {quota // CLUSTER}"
    assert cached_bytes(cache) <= quota
    assert_qemu_check(cache)
