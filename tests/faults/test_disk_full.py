"""The disk under the caches fills while 100 exports serve (issue 9, item 2).

100 cache images on a small tmpfs made for the test, one daemon exporting
them all, readers checking every byte (qemu-io ``read -P``). The disk holds a
fraction of what the caches want: reads must go on with the right bytes
(from the base when a cache cannot grow), the daemon says so (a warning in
its log, the ``no_space`` counter in its stats), every cache passes
``qemu-img check`` and holds only bytes of the base, and caching resumes once
space is freed, without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache.conftest import (
    CLUSTER,
    QEMU_IMG,
    MiB,
    bootcache,
    child_env,
    pattern_base,
    run,
    wait_for,
)

EXPORTS = 100
SIZE = 4 * MiB
CLUSTERS = SIZE // CLUSTER


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 40 MiB tmpfs, mounted for the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def read_export(uri: str, base: bytes) -> bytes:
    args = []
    for k in range(CLUSTERS):
        args += ["-c", f"read -P {base[k * CLUSTER]} {k * CLUSTER} {CLUSTER}"]
    return subprocess.run(["qemu-io", "-r", "-f", "raw", uri, *args],
                          capture_output=True, timeout=300).stdout


def storm(d: Any, base: bytes) -> None:
    """Every export read whole, 16 readers at a time; every byte checked."""
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: read_export(d.uri(f"e{i}"), base), range(EXPORTS)))
    for i, out in enumerate(outs):
        assert b"Pattern verification failed" not in out, (i, out[-1000:])
        assert out.count(b"read 65536/65536") == CLUSTERS, (i, out[-1000:])


def all_stats(d: Any) -> dict[str, Any]:
    """Each cache's counters, by image (one cache per export)."""
    exports = json.loads(d.ctl("stats", "--output", "json").stdout)["exports"]
    return {k: v for e in exports.values() for k, v in e["caches"].items()}


def test_disk_fills_under_100_exports(tmp_path: Path, small_disk: Path, daemons: Any) -> None:
    base = pattern_base(tmp_path / "base.raw", SIZE)
    caches = [small_disk / f"c{i}.qcow2" for i in range(EXPORTS)]
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "4M", "-b",
              tmp_path / "base.raw", "-F", "raw", caches[0], str(SIZE))
    for cache in caches[1:]:
        shutil.copyfile(caches[0], cache)  # a fresh cache: the same bytes every time
    # Ballast leaves room for about 2 of the 100 caches' 4 MiB.
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(max(free_bytes(small_disk) - 8 * MiB, 0)))
    room = free_bytes(small_disk)
    assert room < EXPORTS * SIZE // 10
    d = daemons(*[f"{c}=e{i}" for i, c in enumerate(caches)], "--metrics", "127.0.0.1:0",
                env=child_env(tmp_path))
    storm(d, base)
    stats = all_stats(d)
    assert len(stats) == EXPORTS
    assert sum(s["no_space"] for s in stats.values()) > 0, "the disk never filled"
    held = sum(s["cached_clusters"] for s in stats.values())
    assert 0 < held * CLUSTER <= room
    assert "no space to cache" in d.log()
    with urllib.request.urlopen(d.where["metrics"], timeout=30) as resp:
        scraped = {s.labels["image"]: s.value
                   for fam in text_string_to_metric_families(resp.read().decode())
                   for s in fam.samples if s.name == "bootcache_cache_no_space_total"}
    # The same counters (stores still landing may have added to them since).
    assert scraped.keys() == stats.keys()
    assert all(scraped[image] >= s["no_space"] for image, s in stats.items())
    # A full disk, read again: still every byte right.
    storm(d, base)
    # Space returns: caching resumes in the same daemon.
    ballast.unlink()

    def caching_again() -> bool:
        storm(d, base)
        return sum(s["cached_clusters"] for s in all_stats(d).values()) > held

    wait_for(caching_again, 120, "caching to resume after space was freed")
    assert d.stop() == 0
    for cache in caches:
        spec = {"driver": "qcow2", "backing": None,
                "file": {"driver": "file", "filename": str(cache)}}
        proc = run([QEMU_IMG, "check", "-U", "json:" + json.dumps(spec)], check=False)
        assert proc.returncode == 0, (cache, proc.stdout.decode() + proc.stderr.decode())
    # What the caches hold is the base's bytes (qemu-img compare reads the
    # cache's own clusters first, the base below them).
    for cache in caches[::10]:
        run([QEMU_IMG, "compare", "-U", "-f", "qcow2", "-F", "raw", str(cache),
             str(tmp_path / "base.raw")])
