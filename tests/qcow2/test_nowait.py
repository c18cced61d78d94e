"""Reads served without waiting (``pread_nowait``) from images qemu-img and
qemu-io wrote: a range of clusters contiguous on the host is one read and
returns exactly what QEMU reads; any other range is left to ``pread``."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from bootcache.layers.chain import open_layer
from bootcache.qcow2.image import Qcow2Image

from .conftest import MiB, qemu_raw_bytes, run_qemu_img, run_qemu_io


def test_contiguous_ranges_read_as_qemu_reads_them(tmp_path: Path) -> None:
    rng = random.Random(13)
    raw = tmp_path / "src.raw"
    data = bytearray(8 * MiB)
    data[0:3 * MiB] = rng.randbytes(3 * MiB)  # allocated in order by convert
    raw.write_bytes(data)
    img = tmp_path / "img.qcow2"
    run_qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    # Allocated in reverse order: guest-adjacent, not host-adjacent.
    run_qemu_io(img, ["write -P 0x22 5M 64k", "write -P 0x33 5056k 64k",
                      "write -z 6M 64k", "write -P 0x44 6208k 64k"])
    expected = qemu_raw_bytes(img, fmt="qcow2")

    async def go() -> None:
        layer = await open_layer(str(img))
        assert isinstance(layer, Qcow2Image)
        try:
            assert await layer.pread(0, layer.size) == expected  # loads the L2 table
            whole = layer.pread_nowait(0, 2 * MiB)
            assert whole is not None and whole == expected[:2 * MiB]
            served = 0
            for _ in range(300):
                length = rng.choice([4096, 65536, 128 << 10, 1 * MiB, 2 * MiB,
                                     rng.randrange(1, 2 * MiB)])
                offset = rng.randrange(0, layer.size - length)
                got = layer.pread_nowait(offset, length)
                if got is not None:
                    served += 1
                    assert got == expected[offset:offset + length], (offset, length)
                    # only host-contiguous data clusters are served this way
                    assert offset + length <= 3 * MiB or offset >= 5056 << 10
            assert served > 50
            # Guest-adjacent clusters written in reverse order: two host runs.
            assert layer.pread_nowait(5056 << 10, 128 << 10) is None
            assert layer.pread_nowait(5056 << 10, 64 << 10) == expected[5056 << 10:5 * MiB]
            assert layer.pread_nowait(3 * MiB - 4096, 8192) is None  # into a hole
            assert layer.pread_nowait(6 * MiB, 4096) is None  # a zero cluster
            assert layer.pread_nowait(0, 2 * MiB + 4096) is None  # over the size limit
            assert layer.pread_nowait(layer.size - 4096, 8192) is None  # past the end
        finally:
            await layer.close()

    asyncio.run(go())
