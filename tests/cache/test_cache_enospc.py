"""Acceptance 6: a fill that runs out of disk space.

The cache lives on a small tmpfs (3 MiB) mounted by the test, the base on
the ordinary file system. Reads stay correct when the cache cannot store,
the image stays acceptable to qemu-img check (0, or 3 for leaked clusters),
and caching resumes once space returns (a filler file is deleted).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bootcache
from bootcache.layers.chain import ChainPolicy

from .conftest import (
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_stats,
    create_cache,
    make_base,
    qemu_convert_raw,
)

KiB = 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True,
                              check=False).returncode == 0:
                break
            time.sleep(0.1)


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\xff" * size)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def setup(tmp_path: Path, small_fs: Path, filler: int,
          cluster_size: int) -> tuple[Path, bytes, ChainPolicy]:
    based = tmp_path / "based"
    based.mkdir()
    base = make_base(based / "base.raw", 8 * MiB, seed=61)
    cache = small_fs / "cache.qcow2"
    create_cache(cache, based / "base.raw", quota="100M",
                 extra_opts=f"cluster_size={cluster_size}")
    fill(small_fs / "filler", filler)
    return cache, base, ChainPolicy(allowed_dirs=[str(small_fs), str(based)])


def test_caching_resumes_in_the_same_process(tmp_path: Path, small_fs: Path) -> None:
    cache, base, policy = setup(tmp_path, small_fs, 1 * MiB, 64 * KiB)
    cs = 64 * KiB
    with bootcache.open(str(cache), policy=policy) as img:
        data = b"".join(img.read(off, 256 * KiB) for off in range(0, len(base), 256 * KiB))
        assert_bytes(data, base, "first pass on a full disk")
        stored = img.layer.stats()["clusters_stored"]  # type: ignore[attr-defined]
        assert 0 < stored < len(base) // cs
        # Every reservation of a store that did not fit was given back; what
        # was stored is held.
        quota = img.layer.quota  # type: ignore[attr-defined]
        assert quota.reserved == 0 and len(quota) == stored
        (small_fs / "filler").unlink()
        # Keep reading clusters that are not cached until one is stored again.
        deadline = time.monotonic() + 20
        ci = len(base) // cs - 1
        while img.layer.stats()["clusters_stored"] == stored:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "caching did not resume within 20 s"
            off = ci * cs
            assert_bytes(img.read(off, cs), base[off:off + cs], f"cluster {ci}")
            ci = ci - 1 if ci > stored + 1 else len(base) // cs - 1
            time.sleep(0.2)
        assert_bytes(img.read(0, len(base)), base, "after caching resumed")
    assert_qemu_check(cache, allow_leaks=True)
    assert cache_stats(cache)["clusters_stored"] > stored
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert")
