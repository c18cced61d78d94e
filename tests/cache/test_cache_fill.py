"""Acceptance 1 (local-file base): the cache returns the base's bytes, a second
pass reads nothing from the base, and the same holds after a restart.

The base is counted by wrapping the base layer's ``pread`` in this process
and by the persistent counters (``bytes_from_base``) across processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

import bootcache
from bootcache.layers.chain import open_layer

from .conftest import (
    CLUSTER,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_stats,
    cached_bytes,
    child_env,
    clusters_of,
    create_cache,
    make_base,
    qemu_convert_raw,
    run,
    sha,
)

READER = Path(__file__).with_name("reader.py")


class CountingBase:
    """Wraps a layer's reads to record every (offset, length) read from it."""

    def __init__(self, layer: Any) -> None:
        self.reads: list[tuple[int, int]] = []
        self._pread = layer.pread

        async def pread(offset: int, length: int) -> bytes:
            self.reads.append((offset, length))
            data: bytes = await self._pread(offset, length)
            return data

        real_now = layer.pread_nowait

        def pread_nowait(offset: int, length: int) -> bytes | None:
            data: bytes | None = real_now(offset, length)
            if data is not None:
                self.reads.append((offset, length))
            return data

        layer.pread = pread
        layer.pread_nowait = pread_nowait

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.reads)


def read_all(img: bootcache.api.Image, chunk: int) -> bytes:
    return b"".join(img.read(off, min(chunk, img.size - off))
                    for off in range(0, img.size, chunk))


@pytest.mark.parametrize("use_o", [False, True], ids=["--cache-quota", "-o cache_img_quota"])
def test_second_pass_and_reopen_read_nothing_from_base(tmp_path: Path, use_o: bool) -> None:
    size = 4 * MiB + 40 * 1024 + 512  # a partial last cluster (QEMU wants 512-byte sectors)
    base = make_base(tmp_path / "base.raw", size, seed=1)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=100 * MiB, use_o=use_o)

    with bootcache.open(str(cache)) as img:
        counter = CountingBase(img.layer.base)  # type: ignore[attr-defined]
        assert_bytes(read_all(img, 300_001), base, "first pass")
        assert counter.bytes == size, counter.reads
        assert set(clusters_of(counter.reads).values()) == {1}, \
            f"the first pass must fetch each cluster exactly once: {counter.reads}"
        counter.reads.clear()
        assert_bytes(read_all(img, 1 * MiB), base, "second pass")
        assert counter.reads == [], "a warm cache must not read the base"
        stats = img.layer.stats()  # type: ignore[attr-defined]
    assert stats["bytes_from_base"] == size
    assert stats["bytes_from_cache"] >= size

    on_disk = cache_stats(cache)
    assert on_disk["bytes_from_base"] == size, on_disk
    assert cached_bytes(cache) == size  # QEMU maps up to the virtual size

    # Reopen in this process: still nothing from the base.
    with bootcache.open(str(cache)) as img:
        counter = CountingBase(img.layer.base)  # type: ignore[attr-defined]
        assert_bytes(read_all(img, 777_777), base, "after reopen")
        assert counter.reads == []
    assert cache_stats(cache)["bytes_from_base"] == size

    # A new process.
    proc = run([sys.executable, READER, "pass", cache, tmp_path / "base.raw"], env=child_env())
    result = json.loads(proc.stdout.decode().splitlines()[-1])
    assert result["sha256"] == sha(base)
    assert result["stats"]["bytes_from_base"] == size, "the new process read from the base"
    assert cache_stats(cache)["bytes_from_base"] == size

    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert of the warm cache")


def test_misaligned_partial_reads(tmp_path: Path, rng: random.Random) -> None:
    """Random offsets and lengths (cold, half warm, warm) always return the base's bytes."""
    size = 3 * MiB + 777
    base = make_base(tmp_path / "base.raw", size, seed=2)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="1G")
    with bootcache.open(str(cache)) as img:
        for _ in range(400):
            n = rng.choice([0, 1, 2, 511, 4095, CLUSTER - 1, CLUSTER, CLUSTER + 1, 300_000])
            n = min(n, size)
            off = rng.randrange(0, size - n + 1)
            assert_bytes(img.read(off, n), base[off:off + n], f"read {off}+{n}")
        # The last byte, and reads ending exactly at the end.
        assert img.read(size - 1, 1) == base[-1:]
        assert_bytes(img.read(size - 5000, 5000), base[-5000:], "tail")
    assert_qemu_check(cache)


def test_overlay_on_cache_fills_it(tmp_path: Path) -> None:
    """The product's stack: vm.qcow2 -> cache.qcow2 -> base.raw, read through the overlay."""
    size = 2 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=3)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    from .conftest import bootcache as bootcache_cli
    bootcache_cli("create", "-q", "-f", "qcow2", "-b", "cache.qcow2", "-F", "qcow2",
                  tmp_path / "vm1.qcow2")
    with bootcache.open(str(tmp_path / "vm1.qcow2")) as img:
        assert_bytes(img.read(0, size), base, "through the overlay")
    assert cached_bytes(cache) == size
    assert cache_stats(cache)["bytes_from_base"] == size
    with bootcache.open(str(tmp_path / "vm1.qcow2")) as img:
        assert_bytes(img.read(0, size), base, "through the overlay, warm")
    assert cache_stats(cache)["bytes_from_base"] == size


def test_client_writes_are_refused(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB, seed=4)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")

    async def main() -> None:
        layer = await open_layer(str(cache))
        try:
            assert layer.read_only
            for call in (layer.pwrite(0, b"x" * 512), layer.write_zeroes(0, 4096),
                         layer.discard(0, CLUSTER)):
                with pytest.raises(bootcache.errors.BootcacheError):
                    await call
        finally:
            await layer.close()

    asyncio.run(main())
    assert cached_bytes(cache) == 0


@pytest.mark.parametrize("compressed", [False, True])
def test_qcow2_base(tmp_path: Path, compressed: bool) -> None:
    """A qcow2 base (made by qemu-img, compressed or not) under a cache."""
    size = 2 * MiB
    raw = make_base(tmp_path / "base.raw", size, seed=5)
    raw = raw[:CLUSTER] + bytes(CLUSTER) + raw[2 * CLUSTER:]  # one zero cluster
    (tmp_path / "base.raw").write_bytes(raw)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compressed else []),
         tmp_path / "base.raw", tmp_path / "base.qcow2"])
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.qcow2", quota="100M", backing_fmt="qcow2")
    with bootcache.open(str(cache)) as img:
        assert_bytes(read_all(img, 100_000), raw, "first pass")
        assert_bytes(read_all(img, 1 * MiB), raw, "second pass")
        assert img.layer.stats()["bytes_from_base"] == size  # type: ignore[attr-defined]
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), raw, "qemu-img convert")


def test_sparse_base_with_zero_regions(tmp_path: Path) -> None:
    size = 2 * MiB
    data = bytearray(make_base(tmp_path / "base.raw", size, seed=6))
    data[3 * CLUSTER:6 * CLUSTER] = bytes(3 * CLUSTER)           # whole zero clusters
    data[8 * CLUSTER + 100:9 * CLUSTER - 100] = bytes(CLUSTER - 200)  # mostly zero
    with open(tmp_path / "base.raw", "wb") as f:
        f.write(data[:3 * CLUSTER])
        f.seek(6 * CLUSTER)                                       # a real hole
        f.write(data[6 * CLUSTER:])
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    for _ in range(2):
        with bootcache.open(str(cache)) as img:
            assert_bytes(read_all(img, 123_456), bytes(data), "sparse base")
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), bytes(data), "qemu-img convert")


def test_writable_overlay_keeps_writes_out_of_the_cache(tmp_path: Path) -> None:
    size = 2 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=7)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    from .conftest import bootcache as bootcache_cli
    bootcache_cli("create", "-q", "-f", "qcow2", "-b", "cache.qcow2", "-F", "qcow2",
                  tmp_path / "vm1.qcow2")
    expected = bytearray(base)
    with bootcache.open(str(tmp_path / "vm1.qcow2"), writable=True) as img:
        img.write(CLUSTER + 10, b"\xee" * 5000)          # partial cluster: COW via the cache
        expected[CLUSTER + 10:CLUSTER + 5010] = b"\xee" * 5000
        img.write_zeroes(4 * CLUSTER, CLUSTER)
        expected[4 * CLUSTER:5 * CLUSTER] = bytes(CLUSTER)
        assert_bytes(img.read(0, size), bytes(expected), "through the overlay")
    assert_qemu_check(cache)
    assert_qemu_check(tmp_path / "vm1.qcow2")
    assert_bytes(qemu_convert_raw(cache), base, "the cache holds only the base's bytes")
    assert_bytes(qemu_convert_raw(tmp_path / "vm1.qcow2"), bytes(expected), "QEMU via vm1")
