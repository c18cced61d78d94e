"""A warm cache serves reads of up to 2 MiB over clusters it stored
contiguously with one local read and no waiting (``pread_nowait``), and
leaves misses and due checks to ``pread``."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer

from .conftest import MiB, assert_bytes, create_cache, make_base


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
            assert layer.pread_nowait(0, 4096) is None  # cold: a miss waits
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
            assert layer.pread_nowait(8 * MiB - 4096, 8192) is None  # runs into a miss
        finally:
            await layer.close()

    asyncio.run(go())
