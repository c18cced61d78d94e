"""The L2 table cache keeps the tables in use: the hot-read lookup
(``data_host``, no await) counts as a use, so the tables it serves are not
the first ones evicted when cold lookups load others."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

from .conftest import KiB, MiB, qemu_img_create, run_qemu_io


def test_tables_served_by_the_hot_lookup_stay_cached(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    # 512-byte clusters: one L2 table covers 32 KiB, so 64 tables cover 2 MiB.
    qemu_img_create(path, 2 * MiB, cluster_size=512)
    run_qemu_io(path, ["write -P 0x11 0 2M"])
    table = 32 * KiB

    async def go() -> list[int]:
        img = await Qcow2Image.open(FileSource(str(path)))
        img.map.l2_cache.capacity = 4
        await img.pread(0, 512)  # loads table 0
        misses = []
        for k in range(1, 64):
            # A hot read of table 0 between cold reads of other tables.
            if img.data_host(100, 8) < 0:
                misses.append(k)
            await img.pread(k * table, 512)
        await img.close()
        return misses

    assert asyncio.run(go()) == []
