"""Acceptance 1 and 3 over remote bases: nbdkit (its log filter counts every
read the base serves) and qemu-nbd, reached through ``nbd+unix://`` backing
files.

Reads made while opening (the base identity samples a few blocks) are not
counted: each count starts once the image is open.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bootcache
from bootcache.layers.chain import open_layer

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    MiB,
    Nbdkit,
    QemuNbd,
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

pytest.importorskip("bootcache.nbd.client", reason="the NBD client is not available")

READER = Path(__file__).with_name("reader.py")


@pytest.fixture
def nbdkit_base(tmp_path: Path, sockdir: str) -> Iterator[tuple[Nbdkit, bytes]]:
    data = make_base(tmp_path / "base.raw", 4 * MiB, seed=11)
    kit = Nbdkit(tmp_path / "base.raw", sockdir)
    try:
        yield kit, data
    finally:
        kit.stop()


def read_all(img: bootcache.Image, chunk: int) -> bytes:
    return b"".join(img.read(off, min(chunk, img.size - off))
                    for off in range(0, img.size, chunk))


def test_nbdkit_base_second_pass_and_restart(tmp_path: Path,
                                             nbdkit_base: tuple[Nbdkit, bytes]) -> None:
    kit, base = nbdkit_base
    size = len(base)
    nclusters = size // CLUSTER
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, kit.uri, quota="100M")

    with bootcache.open(str(cache)) as img:
        opened = len(kit.settle())
        assert_bytes(read_all(img, 250_000), base, "first pass")
        first = kit.settle()[opened:]
        counts = clusters_of(first)
        assert counts == dict.fromkeys(range(nclusters), 1), \
            f"each cluster must come from the base exactly once; base reads: {first}"
        assert_bytes(read_all(img, 1 * MiB), base, "second pass")
        assert kit.settle()[opened + len(first):] == [], "a warm cache read the base"
    assert cache_stats(cache)["bytes_from_base"] == size
    assert cached_bytes(cache) == size

    # A new process: after opening it, not one read reaches the base.
    proc = run([sys.executable, READER, "pass", cache, tmp_path / "base.raw", kit.logfile],
               env=child_env())
    result = json.loads(proc.stdout.decode().splitlines()[-1])
    assert result["sha256"] == sha(base)
    assert result["reads_after_pass"] == result["reads_after_open"], \
        "the restarted process read from the base"
    assert result["stats"]["bytes_from_base"] == size
    assert cache_stats(cache)["bytes_from_base"] == size

    # QEMU reads the warm cache from the cache image itself, not from nbdkit.
    before = len(kit.settle())
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert of the warm cache")
    assert kit.settle()[before:] == [], "QEMU read cached clusters from the base"
    assert_qemu_check(cache)
    info = json.loads(run([QEMU_IMG, "info", "-U", "--output", "json", cache]).stdout)
    assert info["backing-filename"] == kit.uri


def test_qemu_nbd_base_second_pass_and_restart(tmp_path: Path, sockdir: str) -> None:
    size = 3 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=12)
    server = QemuNbd(tmp_path / "base.raw", sockdir)
    try:
        cache = tmp_path / "cache.qcow2"
        create_cache(cache, server.uri, quota="100M")
        with bootcache.open(str(cache)) as img:
            assert_bytes(read_all(img, 100_000), base, "first pass")
            assert img.layer.stats()["bytes_from_base"] == size  # type: ignore[attr-defined]
            assert_bytes(read_all(img, 1 * MiB), base, "second pass")
            assert img.layer.stats()["bytes_from_base"] == size  # type: ignore[attr-defined]
        assert cache_stats(cache)["bytes_from_base"] == size
        with bootcache.open(str(cache)) as img:
            assert_bytes(read_all(img, 1 * MiB), base, "after reopen")
        assert cache_stats(cache)["bytes_from_base"] == size
        proc = run([sys.executable, READER, "pass", cache, tmp_path / "base.raw"],
                   env=child_env())
        result = json.loads(proc.stdout.decode().splitlines()[-1])
        assert result["sha256"] == sha(base)
        assert result["stats"]["bytes_from_base"] == size
        assert_qemu_check(cache)
        assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert")
    finally:
        server.stop()


def test_32_concurrent_readers_fetch_each_cluster_once(tmp_path: Path,
                                                      nbdkit_base: tuple[Nbdkit, bytes]) -> None:
    """Acceptance 3: one cold region, 32 tasks with different alignments."""
    kit, base = nbdkit_base
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, kit.uri, quota="100M")
    region_start, region_len = 1 * MiB + 3 * CLUSTER, 1 * MiB + 5000

    async def reader(layer: bootcache.block.layer.BlockLayer, k: int) -> set[int]:
        # Task k starts k*517 bytes in and reads chunks of a size of its own.
        step = 3000 + k * 4099
        off = region_start + k * 517
        touched: set[int] = set()
        end = region_start + region_len
        while off < end:
            n = min(step, end - off)
            data = await layer.pread(off, n)
            assert_bytes(data, base[off:off + n], f"task {k} read {off}+{n}")
            touched.update(range(off // CLUSTER, (off + n - 1) // CLUSTER + 1))
            off += n
        return touched

    async def main() -> tuple[set[int], dict[str, int]]:
        layer = await open_layer(str(cache))
        try:
            await asyncio.sleep(0)
            opened = len(kit.settle())
            sets = await asyncio.gather(*(reader(layer, k) for k in range(32)))
            stats = layer.stats()  # type: ignore[attr-defined]
            stats["opened"] = opened
            return set().union(*sets), stats
        finally:
            await layer.close()

    wanted, stats = asyncio.run(main())
    fetched = kit.settle()[stats["opened"]:]
    counts = clusters_of(fetched)
    assert counts == dict.fromkeys(wanted, 1), \
        f"clusters fetched more than once or not wanted: {sorted(counts.items())}"
    assert stats["bytes_from_base"] == len(wanted) * CLUSTER
    assert stats["clusters_stored"] == len(wanted)
    assert cached_bytes(cache) == len(wanted) * CLUSTER
    assert_qemu_check(cache)


def test_nbd_base_replaced_is_detected(tmp_path: Path, sockdir: str) -> None:
    """Acceptance 4 over NBD: the export is restarted over new content (same size)."""
    size = 2 * MiB
    old = make_base(tmp_path / "base.raw", size, seed=13)
    kit = Nbdkit(tmp_path / "base.raw", sockdir)
    cache = tmp_path / "cache.qcow2"
    try:
        create_cache(cache, kit.uri, quota="100M")
        with bootcache.open(str(cache)) as img:
            assert_bytes(read_all(img, 1 * MiB), old, "warming")
        assert cached_bytes(cache) == size
    finally:
        kit.stop()
    new = make_base(tmp_path / "base.raw", size, seed=14)
    kit = Nbdkit(tmp_path / "base.raw", sockdir)
    try:
        with bootcache.open(str(cache)) as img:
            assert_bytes(read_all(img, 1 * MiB), new, "after the base changed")
        stats = cache_stats(cache)
        assert stats["resets"] == 1, stats
        assert_bytes(qemu_convert_raw(cache), new, "qemu-img convert after the reset")
    finally:
        kit.stop()
