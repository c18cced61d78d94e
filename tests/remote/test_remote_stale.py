"""Issue 5, acceptance 3: an object replaced (new ETag) under a warm cache is
detected, and no stale byte is served.

nginx: the file it serves is replaced (new inode, new mtime, so a new ETag).
S3: a new object is PUT under the same key (new ETag). The old and new
contents differ in every 4 KiB block, so any stale byte shows.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from bootcache.errors import BootcacheError
from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer

from .conftest import Remote
from .test_remote_cache import SIZE, base_image, cache_stats, create_cache, diff_at

HALF = SIZE // 2


def version(seed: int) -> bytes:
    """A disk whose every 4 KiB block starts with the seed, then random bytes."""
    rng = random.Random(seed)
    return b"".join(seed.to_bytes(8, "big") + rng.randbytes(4088) for _ in range(SIZE // 4096))


async def read_checked(layer: CacheLayer, off: int, n: int, want: bytes, what: str) -> None:
    got = await layer.pread(off, n)
    assert got == want[off:off + n], f"{what}: {diff_at(got, want[off:off + n])}"


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
def test_replaced_while_open(remote: Remote, tmp_path: Path) -> None:
    """Half warm, the object is replaced: the next miss sees the new ETag, the
    cache is dropped, and every later read (hits included) is of the new version."""
    old, new = version(1), version(2)
    uri = remote.publish("disk.raw", old)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, "raw")

    async def go() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            await read_checked(layer, 0, HALF, old, "warming the first half")
            await layer.settle()
            remote.replace("disk.raw", new)
            await read_checked(layer, HALF, HALF, new, "a miss after the replacement")
            await read_checked(layer, 0, HALF, new, "the formerly warm half")
            await read_checked(layer, 0, SIZE, new, "the whole disk")
            await layer.settle()
            stats = layer.stats()
            assert stats["resets"] == 1, stats
        finally:
            await layer.close()
        # The cache now holds the new version, and says so when reopened.
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            await read_checked(layer, 0, SIZE, new, "after reopening")
            assert layer.stats()["resets"] == 1
        finally:
            await layer.close()

    asyncio.run(go())
    assert cache_stats(cache)["resets"] == 1


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
def test_replaced_while_closed(remote: Remote, fmt: str, tmp_path: Path) -> None:
    """Fully warm and closed, the object is replaced: opening detects it."""
    old, new = version(3), version(4)
    name = f"disk.{fmt}"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    uri = remote.publish(name, base_image(tmp_path / "old", old, fmt) if fmt != "raw" else old)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, fmt)

    async def warm() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            await read_checked(layer, 0, SIZE, old, "warming")
        finally:
            await layer.close()

    async def reread() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            assert layer.stats()["resets"] == 1, "the new version went unnoticed"
            assert layer.stats()["cached_clusters"] == 0
            await read_checked(layer, 0, SIZE, new, "after the replacement")
        finally:
            await layer.close()

    asyncio.run(warm())
    assert cache_stats(cache)["bytes_from_base"] == SIZE
    remote.replace(name, base_image(tmp_path / "new", new, fmt) if fmt != "raw" else new)
    asyncio.run(reread())
    stats = cache_stats(cache)
    assert stats["resets"] == 1
    assert stats["bytes_from_base"] == 2 * SIZE


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
def test_qcow2_base_replaced_while_open(remote: Remote, tmp_path: Path) -> None:
    """A qcow2 base replaced under an open cache: its metadata changed too, so a
    read may fail cleanly (reopen needed) or return the new bytes, never old ones."""
    old, new = version(5), version(6)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    uri = remote.publish("disk.qcow2", base_image(tmp_path / "old", old, "qcow2"))
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, "qcow2")

    async def go() -> None:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            await read_checked(layer, 0, HALF, old, "warming the first half")
            await layer.settle()
            remote.replace("disk.qcow2", base_image(tmp_path / "new", new, "qcow2"))
            for off, n in ((HALF, HALF), (0, HALF), (0, SIZE)):
                try:
                    got = await asyncio.wait_for(layer.pread(off, n), 60)
                except BootcacheError:
                    continue  # a clean error: the caller reopens
                assert got == new[off:off + n], \
                    f"read {off}+{n} after the replacement: {diff_at(got, new[off:off + n])}"
        finally:
            await layer.close()
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            await read_checked(layer, 0, SIZE, new, "after reopening")
        finally:
            await layer.close()

    asyncio.run(go())
