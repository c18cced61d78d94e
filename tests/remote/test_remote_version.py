"""A warm cache that never misses still notices a replaced remote object.

HTTP and S3 sources are asked for their object's current version every few
seconds while a cache serves hits; a qcow2 base that changed is reopened.
Also: readahead fetches past a miss in the same request.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import ChainPolicy, open_layer

from .conftest import Remote
from .test_remote_cache import SIZE, base_image, create_cache
from .test_remote_stale import version


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_fully_warm_cache_notices_replacement(remote: Remote, tmp_path: Path,
                                              fmt: str) -> None:
    old, new = version(11), version(12)
    for d in ("old", "new"):
        (tmp_path / d).mkdir()
    uri = remote.publish("disk.img", base_image(tmp_path / "old", old, fmt))
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, fmt)

    async def go() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            assert await layer.pread(0, SIZE) == old
            await layer.settle()
            remote.replace("disk.img", base_image(tmp_path / "new", new, fmt))
            # Only hits from now on: the change must still show within seconds.
            deadline = time.monotonic() + 20
            while True:
                got = await layer.pread(0, SIZE)
                if got == new:
                    break
                assert got == old, "a mix of old and new bytes"
                assert time.monotonic() < deadline, "the replaced object was never noticed"
                await asyncio.sleep(0.5)
            await layer.settle()
            assert layer.stats()["resets"] == 1
            assert await layer.pread(0, SIZE) == new
        finally:
            await layer.close()

    asyncio.run(go())


@pytest.mark.parametrize("remote", ["nginx"], indirect=True)
def test_readahead_fetches_past_a_miss(remote: Remote, tmp_path: Path) -> None:
    data = version(21)
    uri = remote.publish("disk.raw", data)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, "raw")

    async def go() -> None:
        layer = await open_layer(str(cache), policy=ChainPolicy(cache_readahead=256 << 10))
        assert isinstance(layer, CacheLayer)
        try:
            assert await layer.pread(0, 4096) == data[:4096]
            await layer.settle()
            # One cluster asked for, four more read ahead, all in one request.
            assert layer.stats()["bytes_from_base"] == 5 * 65536
            before = remote.touches()
            assert await layer.pread(65536, 4 * 65536) == data[65536:5 * 65536]
            assert remote.touches() == before
        finally:
            await layer.close()

    asyncio.run(go())


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_racing_detections_reset_once(remote: Remote, tmp_path: Path, fmt: str) -> None:
    """One replacement, noticed at once by every detector: the background
    version check (several of them), fetches of cold clusters (ETag mismatch
    inside the read) and reads of warm ones. The cache is dropped exactly once,
    and every read returns one version whole."""
    old, new = version(31), version(32)
    for d in ("old", "new"):
        (tmp_path / d).mkdir()
    uri = remote.publish("disk.img", base_image(tmp_path / "old", old, fmt))
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, fmt)
    half = SIZE // 2

    async def read(off: int, n: int) -> None:
        got = await layer.pread(off, n)
        assert got in (old[off:off + n], new[off:off + n]), "a mix of old and new bytes"

    async def go() -> None:
        nonlocal layer
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            assert await layer.pread(0, half) == old[:half]
            await layer.settle()
            remote.replace("disk.img", base_image(tmp_path / "new", new, fmt))
            version = layer.base_version
            assert version is not None
            step = 64 << 10
            await asyncio.gather(
                *(version.check() for _ in range(3)),
                *(read(off, step) for off in range(half, SIZE, step)),
                *(read(off, step) for off in range(0, half, step)),
            )
            await layer.settle()
            assert layer.stats()["resets"] == 1, layer.stats()
            assert await layer.pread(0, SIZE) == new
            await layer.settle()
            assert layer.stats()["resets"] == 1, layer.stats()
        finally:
            await layer.close()

    layer: CacheLayer
    asyncio.run(go())
