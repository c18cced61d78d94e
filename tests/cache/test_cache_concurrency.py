"""Acceptance 3 over a local base: 32 concurrent readers of one cold region
fetch each cluster from the base exactly once (single flight).

The base layer's ``pread`` and ``pread_nowait`` are wrapped to count reads
(and, in one run, to be slow, so the readers really overlap while fetches
are in flight). The same test over
nbdkit, counted by its log filter, is in test_cache_nbd.py.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from bootcache.block.layer import BlockLayer
from bootcache.layers.chain import open_layer

from .conftest import (
    CLUSTER,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_stats,
    cached_bytes,
    clusters_of,
    create_cache,
    make_base,
)


def waits(offset: int, length: int) -> None:
    """A base's ``pread_nowait`` that never reads without waiting (a remote base)."""
    return None


async def reader(layer: BlockLayer, base: bytes, start: int, end: int, first: int,
                 step: int) -> set[int]:
    """Read [first, end) in chunks of ``step``, then [start, first); check every byte."""
    touched: set[int] = set()
    for lo, hi in ((first, end), (start, first)):
        off = lo
        while off < hi:
            n = min(step, hi - off)
            data = await layer.pread(off, n)
            assert_bytes(data, base[off:off + n], f"read {off}+{n}")
            touched.update(range(off // CLUSTER, (off + n - 1) // CLUSTER + 1))
            off += n
    return touched


@pytest.mark.parametrize("delay", [0.0, 0.005])
def test_32_readers_one_fetch_per_cluster(tmp_path: Path, delay: float) -> None:
    size = 8 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=21)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    rng = random.Random(delay)
    start, end = 2 * MiB + 1234, 4 * MiB - 999

    async def main() -> tuple[list[tuple[int, int]], set[int], dict[str, int]]:
        layer = await open_layer(str(cache))
        try:
            below = layer.base  # type: ignore[attr-defined]
            reads: list[tuple[int, int]] = []
            real = below.pread

            async def counted(offset: int, length: int) -> bytes:
                reads.append((offset, length))
                if delay:
                    await asyncio.sleep(delay)
                data: bytes = await real(offset, length)
                return data

            real_now = below.pread_nowait

            def counted_now(offset: int, length: int) -> bytes | None:
                if delay:
                    return None  # a slow base: every fetch waits (as a remote one)
                data: bytes | None = real_now(offset, length)
                if data is not None:
                    reads.append((offset, length))
                return data

            below.pread = counted
            below.pread_nowait = waits  # a slow base
            below.pread_nowait = counted_now
            tasks = []
            for k in range(32):
                # Different alignments: odd byte offsets, sector and cluster multiples.
                first = start + rng.choice([k, 511 * k, 4096 * k, CLUSTER * k + 1,
                                            rng.randrange(end - start)])
                first = min(first, end - 1)
                step = rng.choice([1000 + k, 4096, CLUSTER, CLUSTER + 17, 3 * CLUSTER - 5])
                tasks.append(reader(layer, base, start, end, first, step))
            touched = await asyncio.gather(*tasks)
            stats = layer.stats()  # type: ignore[attr-defined]
            return reads, set().union(*touched), stats
        finally:
            await layer.close()

    reads, wanted, stats = asyncio.run(main())
    counts = clusters_of(reads)
    twice = {ci: c for ci, c in counts.items() if c > 1}
    assert not twice, f"clusters fetched more than once: {twice}"
    assert set(counts) == wanted
    assert all(off % CLUSTER == 0 for off, _ in reads), "fetches must be cluster aligned"
    assert stats["bytes_from_base"] == len(wanted) * CLUSTER
    assert cached_bytes(cache) == len(wanted) * CLUSTER
    assert cache_stats(cache)["bytes_from_base"] == len(wanted) * CLUSTER
    assert_qemu_check(cache)


def test_concurrent_readers_of_overlapping_regions(tmp_path: Path) -> None:
    """Readers of different but overlapping regions still share fetches."""
    size = 4 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=22)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")

    async def main() -> list[tuple[int, int]]:
        layer = await open_layer(str(cache))
        try:
            below = layer.base  # type: ignore[attr-defined]
            reads: list[tuple[int, int]] = []
            real = below.pread

            async def counted(offset: int, length: int) -> bytes:
                reads.append((offset, length))
                await asyncio.sleep(0.002)
                data: bytes = await real(offset, length)
                return data

            below.pread = counted
            tasks = []
            for k in range(32):
                lo = k * 100_003 % (size // 2)
                hi = min(lo + 1 * MiB + k * 997, size)
                tasks.append(reader(layer, base, lo, hi, lo, 7 * 4096 + k))
            await asyncio.gather(*tasks)
            return reads
        finally:
            await layer.close()

    reads = asyncio.run(main())
    twice = {ci: c for ci, c in clusters_of(reads).items() if c > 1}
    assert not twice, f"clusters fetched more than once: {twice}"


def test_a_failed_fetch_fails_its_waiters_and_is_retried(tmp_path: Path) -> None:
    """The base fails the first fetch: every reader sharing it gets an error (never
    wrong bytes), nothing is stored, and the next read fetches again."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=23)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")

    async def main() -> tuple[list[object], list[tuple[int, int]]]:
        layer = await open_layer(str(cache))
        try:
            below = layer.base  # type: ignore[attr-defined]
            real = below.pread
            reads: list[tuple[int, int]] = []

            async def flaky(offset: int, length: int) -> bytes:
                reads.append((offset, length))
                await asyncio.sleep(0.01)
                if len(reads) == 1:
                    raise OSError(5, "injected I/O error")
                data: bytes = await real(offset, length)
                return data

            below.pread = flaky
            below.pread_nowait = waits  # a slow base

            async def one(k: int) -> bytes:
                return await layer.pread(CLUSTER + 100 * k, 1000)

            results = await asyncio.gather(*(one(k) for k in range(8)),
                                           return_exceptions=True)
            for k, r in enumerate(results):
                if not isinstance(r, BaseException):
                    off = CLUSTER + 100 * k
                    assert_bytes(r, base[off:off + 1000], f"reader {k}")
            assert any(isinstance(r, OSError) for r in results), results
            off = CLUSTER + 5
            assert_bytes(await layer.pread(off, 3000), base[off:off + 3000], "retry")
            assert_bytes(await layer.pread(off, 3000), base[off:off + 3000], "cached")
            return list(results), reads
        finally:
            await layer.close()

    _, reads = asyncio.run(main())
    assert len(reads) == 2, f"expected one failed and one good fetch: {reads}"
    assert cached_bytes(cache) == CLUSTER
    assert_qemu_check(cache)
