"""Acceptance 2 with the stop policy (lru: test_cache_lru.py). The cache never
holds more guest data than its quota (as ``qemu-img map`` counts it: extents
at depth 0 with data), every read stays correct, and ``stop`` keeps what it
has.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import bootcache

from .conftest import (
    CLUSTER,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_stats,
    cached_bytes,
    cached_clusters,
    create_cache,
    make_base,
)


def read_cluster(img: bootcache.Image, base: bytes, ci: int) -> None:
    off = ci * CLUSTER
    assert_bytes(img.read(off, CLUSTER), base[off:off + CLUSTER], f"cluster {ci}")


@pytest.mark.parametrize("quota", [1 * MiB, 1 * MiB + 1000, 3 * CLUSTER - 1])
def test_stop_policy_never_exceeds_quota(tmp_path: Path, quota: int,
                                         rng: random.Random) -> None:
    size = 8 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=31)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=quota)
    limit = quota // CLUSTER * CLUSTER

    with bootcache.open(str(cache)) as img:
        for _ in range(150):
            n = rng.choice([1, 4096, CLUSTER, 3 * CLUSTER + 5, 1 * MiB])
            off = rng.randrange(0, size - n + 1)
            assert_bytes(img.read(off, n), base[off:off + n], f"read {off}+{n}")
        assert img.layer.stats()["used_bytes"] <= quota  # type: ignore[attr-defined]
    held = cached_bytes(cache)
    assert held == limit, f"stop fills up to the quota and no further: {held} vs {limit}"
    kept = cached_clusters(cache)
    assert_qemu_check(cache)

    # A restart does not forget the quota; stop never evicts what it holds.
    with bootcache.open(str(cache)) as img:
        for off in range(0, size, 1 * MiB):
            assert_bytes(img.read(off, 1 * MiB), base[off:off + 1 * MiB], f"reread {off}")
    assert cached_clusters(cache) == kept
    stats = cache_stats(cache)
    assert stats["evictions"] == 0
    assert stats["used_bytes"] <= quota
    assert_qemu_check(cache)


def test_stop_policy_single_read_larger_than_quota(tmp_path: Path) -> None:
    size = 6 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=32)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=1 * MiB, use_o=True)
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, size), base, "one big read")
        assert_bytes(img.read(0, size), base, "again")
    assert cached_bytes(cache) == 1 * MiB
    assert_qemu_check(cache)
