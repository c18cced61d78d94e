"""No L2 table (nor L1 entry, refcount table entry or header) reaches the disk
before what it points to is durable, through every allocation path.

Each test opens a real image on a :class:`RecordingSource` (the engine's I/O
boundary: every pwrite, punch and sync the engine makes), drives one path,
and the recorder judges each write against the last synced state of the file
(tests/qcow2/ordering_recorder.py). The L2 cache is kept tiny so that dirty
tables leave it by eviction, in the middle of other work, not only at flush.
qemu-img check judges the image at the end. The last test breaks the barrier
on purpose and proves the recorder sees it.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

import pytest

from bootcache.block.graph import private_ref
from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer
from bootcache.qcow2.barrier import SyncBarrier
from bootcache.qcow2.check import check_image
from bootcache.qcow2.format import AUTOCLEAR_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

from .conftest import (
    KiB,
    MiB,
    assert_qemu_check_clean,
    bootcache_cli,
    qemu_img_create,
    run_qemu_io,
)
from .ordering_recorder import RecordingSource

_SMALL_L2_CACHE = 4  # tables: evictions write dirty tables back mid-operation


async def _open(path: Path, *, keep_autoclear: int = 0) -> tuple[Qcow2Image, RecordingSource]:
    rec = RecordingSource(FileSource(str(path), writable=True), path.read_bytes())
    img = await Qcow2Image.open(rec, writable=True, keep_autoclear=keep_autoclear)
    img.map.l2_cache.capacity = _SMALL_L2_CACHE
    return img, rec


def _assert_ordered(rec: RecordingSource, path: Path) -> None:
    assert rec.violations == [], "\n".join(rec.violations[:20])
    assert rec.l2_writes > 0 and rec.syncs > 0, "the path wrote no L2 table: nothing was tested"
    assert_qemu_check_clean(path)


def _image(tmp_path: Path, size: int = 8 * MiB, *, refcount_bits: int = 16) -> Path:
    path = tmp_path / "img.qcow2"
    qemu_img_create(path, size, cluster_size=512, refcount_bits=refcount_bits)
    return path


async def _random_writes(img: Qcow2Image, rng: random.Random, count: int) -> None:
    for n in range(count):
        off = rng.randrange(0, img.size - 8 * KiB) & ~511
        await img.pwrite(off + rng.randrange(0, 512), rng.randbytes(rng.randrange(1, 8 * KiB)))
        if n % 16 == 15:
            await img.flush()


def test_data_cluster_allocation_on_write(tmp_path: Path) -> None:
    path = _image(tmp_path)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        await _random_writes(img, random.Random(1), 120)
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_l2_tables_and_refcount_table_growth(tmp_path: Path) -> None:
    # 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB and
    # the first refcount table 2 MiB, so 3 MiB of data allocates hundreds of L2
    # tables and refcount blocks and moves the refcount table.
    path = _image(tmp_path, 4 * MiB, refcount_bits=64)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        table_before = img.refcounts.table_offset
        data = random.Random(2).randbytes(3 * MiB)
        for off in range(0, len(data), 96 * KiB):
            await img.pwrite(off, data[off:off + 96 * KiB])
        assert img.refcounts.table_offset != table_before, "the refcount table did not move"
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_zero_discard_and_unmap(tmp_path: Path) -> None:
    path = _image(tmp_path)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        rng = random.Random(3)
        await img.pwrite(0, rng.randbytes(2 * MiB))
        await img.flush()
        await img.write_zeroes(64 * KiB, 256 * KiB, may_unmap=False)  # zero flag, clusters kept
        await img.write_zeroes(512 * KiB, 256 * KiB, may_unmap=True)  # clusters freed
        await img.flush()  # the free queue releases what the tables stopped pointing to
        await img.discard(1 * MiB, 128 * KiB)
        await img.unmap_clusters(list(range(3000, 3500)))
        await img.flush()
        await img.pwrite(64 * KiB + 100, b"x" * 3000)  # into a preallocated zero cluster
        await _random_writes(img, rng, 40)  # reuses the freed clusters
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_grow_moves_the_l1_table(tmp_path: Path) -> None:
    path = _image(tmp_path, 1 * MiB)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        await img.pwrite(0, random.Random(4).randbytes(512 * KiB))
        l1_before = img.header.l1_table_offset
        await img.grow(64 * MiB)
        assert img.header.l1_table_offset != l1_before
        await img.pwrite(40 * MiB, b"after growing" * 1000)
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_batched_cluster_stores(tmp_path: Path) -> None:
    """store_clusters: runs of fresh clusters (one allocation per batch,
    refcount blocks and tables growing), clusters mapped already, one cluster
    twice in a batch, and the disk's short last cluster; the bytes read back
    are the last ones stored."""
    size = 2 * MiB + 300  # a short last cluster
    path = tmp_path / "img.qcow2"
    qemu_img_create(path, size, cluster_size=512, refcount_bits=64)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        rng = random.Random(7)
        model = bytearray(size)
        last = (size - 1) // 512
        for n in range(60):
            runs: list[tuple[int, bytes]] = []
            for _ in range(rng.randrange(1, 8)):
                first = last if rng.random() < 0.05 else rng.randrange(0, last)
                count = 1 if first == last else rng.randrange(1, min(9, last - first + 1))
                data = rng.randbytes(min(count * 512, size - first * 512))
                runs.append((first, data))
            for first, data in runs:
                model[first * 512:first * 512 + len(data)] = data
            await img.store_clusters(runs)
            if n % 10 == 9:
                await img.flush()
        assert await img.pread(0, size) == bytes(model)
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_copy_on_read_stores_and_eviction_of_a_cache(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(5).randbytes(4 * MiB))
    path = tmp_path / "cache.qcow2"
    # A quota of a quarter of the base: filling it evicts (unmaps) clusters too.
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", "1M", "-b", base,
                  "-F", "raw", "-o", "cluster_size=512", path, check=True)

    async def go() -> RecordingSource:
        img, rec = await _open(path, keep_autoclear=AUTOCLEAR_CACHE)
        img.attach_backing(private_ref(await open_layer(str(base), fmt="raw")))
        cache = await CacheLayer.open(img)
        rng = random.Random(6)
        for _ in range(300):
            off = rng.randrange(0, 4 * MiB - 16 * KiB)
            assert await cache.pread(off, 16 * KiB) == base.read_bytes()[off:off + 16 * KiB]
            if rng.random() < 0.1:
                await cache.settle()
                await cache.flush()
        await cache.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def _corrupt(path: Path) -> None:
    """Zero the refcount of a data cluster (a corruption), clear the COPIED
    flag of an L2 entry, and mark the image dirty."""
    raw = bytearray(path.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    rt_off = struct.unpack_from(">Q", raw, 48)[0]
    l2 = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", raw, l2 + 8)[0]
    host = entry & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2 + 8, entry & ~(1 << 63))
    block = struct.unpack_from(">Q", raw, rt_off)[0]
    struct.pack_into(">H", raw, block + 2 * (host >> 9), 0)
    struct.pack_into(">Q", raw, 72, struct.unpack_from(">Q", raw, 72)[0] | 1)  # dirty bit
    path.write_bytes(raw)


@pytest.mark.parametrize("how", ["check -r all", "open of a dirty image"])
def test_repairs(tmp_path: Path, how: str) -> None:
    path = _image(tmp_path)
    run_qemu_io(path, [f"write -P 0x5a {k * 64 * KiB} 8k" for k in range(40)])
    _corrupt(path)

    async def go() -> RecordingSource:
        if how == "check -r all":
            rec = RecordingSource(FileSource(str(path), writable=True), path.read_bytes())
            img = await Qcow2Image.open(rec)  # read-only: the dirty bit is left to us
            img.writable = True
            img.map.l2_cache.capacity = _SMALL_L2_CACHE
            res = await check_image(img, repair="all")
            assert res.corruptions_fixed >= 2 and res.corruptions == 0
        else:
            img, rec = await _open(path)  # repairs before anything else
        await img.pwrite(3 * MiB, b"after repair" * 500)
        await img.close()
        return rec

    _assert_ordered(asyncio.run(go()), path)


def test_the_recorder_catches_a_broken_barrier(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With the barrier claiming durability without syncing, the same paths
    put L2 entries on disk ahead of their refcounts: the recorder must say so."""
    async def no_sync(self: SyncBarrier, needed: int) -> None:
        self.durable = max(self.durable, self.written)

    monkeypatch.setattr(SyncBarrier, "sync_to", no_sync)
    path = _image(tmp_path)

    async def go() -> RecordingSource:
        img, rec = await _open(path)
        await _random_writes(img, random.Random(1), 60)
        await img.close()
        return rec

    rec = asyncio.run(go())
    assert any("refcount is not durable" in v for v in rec.violations), rec.violations[:5]



def test_only_the_barrier_writes_to_an_open_image() -> None:
    """The recorder above judges the paths that exist; this keeps a new one
    from writing around the barrier (create.py writes new files, not open images)."""
    import ast

    import bootcache.qcow2 as pkg

    offenders = []
    for module in Path(pkg.__file__).parent.glob("*.py"):
        if module.name in ("barrier.py", "create.py"):
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in (
                    "pwrite", "flush", "punch_hole", "truncate") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "source":
                offenders.append(f"{module.name}:{node.lineno}")
    assert offenders == []
