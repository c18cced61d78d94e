"""A cache serves reads of up to 2 MiB without waiting (``pread_nowait``):
hits over clusters it stored contiguously with one local read, misses over
a local base with one read of it (the store follows in the background), and
leaves misses that must wait (a base that cannot read now, a fetch on its
way) and due checks to ``pread``."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer

from .conftest import MiB, assert_bytes, assert_qemu_check, create_cache, make_base


def test_large_hits_without_waiting(tmp_path: Path) -> None:
    base_path = tmp_path / "base.raw"
    base = make_base(base_path, 16 * MiB, seed=13)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, base_path, quota="64M")
    rng = random.Random(13)

    async def go() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            # Cold, over a local base: fetched now, stored in the background.
            assert_bytes(layer.pread_nowait(0, 4096) or b"", base[:4096], "cold miss")
            assert layer.counters.misses == 1
            for off in range(0, 8 * MiB, MiB):  # stores 1 MiB pieces, in order
                assert_bytes(await layer.pread(off, MiB), base[off:off + MiB], f"fill {off}")
            await layer.settle()
            await layer.pread(0, 4096)  # makes the due fingerprint check
            misses = layer.counters.misses
            served = 0
            for _ in range(200):
                length = rng.choice([128 << 10, 1 * MiB, 2 * MiB, rng.randrange(1, 2 * MiB)])
                offset = rng.randrange(0, 8 * MiB - length)
                got = layer.pread_nowait(offset, length)
                if got is None:  # not one host run (metadata allocated in between)
                    got = await layer.pread(offset, length)
                else:
                    served += 1
                assert_bytes(got, base[offset:offset + length], f"{offset}+{length}")
            assert served > 100
            assert layer.counters.misses == misses
            # Runs into a miss: the base is read now for the missing cluster.
            got = layer.pread_nowait(8 * MiB - 4096, 8192)
            assert_bytes(got or b"", base[8 * MiB - 4096:8 * MiB + 4096], "hit and miss")
            assert layer.counters.misses == misses + 1
        finally:
            await layer.close()

    asyncio.run(go())


def test_misses_without_waiting_fetch_once_and_store(tmp_path: Path) -> None:
    """Misses served without waiting keep single flight: a read of a cluster
    whose bytes wait to be stored takes them (no second fetch); after the
    stores, the clusters are hits and the image is clean. A base that cannot
    read without waiting leaves the miss to ``pread``."""
    base_path = tmp_path / "base.raw"
    base = make_base(base_path, 4 * MiB, seed=14)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, base_path, quota="64M")

    async def go() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        below = layer.base
        reads: list[tuple[int, int]] = []
        real_now = below.pread_nowait

        def counted(offset: int, length: int) -> bytes | None:
            reads.append((offset, length))
            data: bytes | None = real_now(offset, length)
            return data

        below.pread_nowait = counted  # type: ignore[method-assign]
        try:
            for off, n in ((0, 3 * 65536), (4096, 8192), (65536 + 7, 70000), (0, 4 * 65536)):
                assert_bytes(layer.pread_nowait(off, n) or b"", base[off:off + n], f"{off}+{n}")
            # Cluster 3 was new in the last read; 0-2 came from the waiting bytes.
            assert reads == [(0, 3 * 65536), (3 * 65536, 65536)]
            await layer.settle()
            assert layer.counters.clusters_stored == 4
            hits = layer.counters.hits
            assert_bytes(layer.pread_nowait(0, 4 * 65536) or b"", base[:4 * 65536], "stored")
            assert layer.counters.hits == hits + 1 and len(reads) == 2
            below.pread_nowait = lambda offset, length: None  # type: ignore[method-assign]
            assert layer.pread_nowait(MiB, 4096) is None  # must wait: pread() fetches
            assert_bytes(await layer.pread(MiB, 4096), base[MiB:MiB + 4096], "waited")
        finally:
            await layer.close()

    asyncio.run(go())
    assert_qemu_check(cache)
