"""Acceptance 6, a disk that stays full: reads keep returning the base's
bytes across periodic flushes and close, the image is acceptable to qemu-img
check, and a new opener caches again once space returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bootcache

from .conftest import (
    MiB,
    assert_bytes,
    assert_qemu_check,
    cached_bytes,
    qemu_convert_raw,
)
from .test_cache_enospc import KiB, free_bytes, setup, small_fs

__all__ = ["small_fs"]


@pytest.mark.parametrize(("cluster_size", "filler"), [
    (64 * KiB, 1 * MiB),
    (64 * KiB, 1 * MiB + 12 * KiB),
    (4 * KiB, 1536 * KiB),
    (512 * KiB, 1 * MiB + 4 * KiB),
])
def test_full_disk_reads_stay_correct_and_image_clean(tmp_path: Path, small_fs: Path,
                                                      cluster_size: int, filler: int) -> None:
    cache, base, policy = setup(tmp_path, small_fs, filler, cluster_size)
    with bootcache.open(str(cache), policy=policy) as img:
        for chunk in (300_001, 1 * MiB):
            data = b"".join(img.read(off, min(chunk, len(base) - off))
                            for off in range(0, len(base), chunk))
            assert_bytes(data, base, f"reads in chunks of {chunk} on a full disk")
    assert free_bytes(small_fs) < 2 * cluster_size + 64 * KiB, "the disk never filled up"
    assert_qemu_check(cache, allow_leaks=True)
    held = cached_bytes(cache)
    assert held < 3 * MiB
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert of the partial cache")

    # Space returns: a new opener caches again.
    (small_fs / "filler").unlink()
    with bootcache.open(str(cache), policy=policy) as img:
        assert_bytes(img.read(0, len(base)), base, "after space returned")
    assert cached_bytes(cache) > held, "caching did not resume after space returned"
    assert_qemu_check(cache, allow_leaks=True)
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert")
