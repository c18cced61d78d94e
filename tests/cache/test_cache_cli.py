"""The cache-image CLI: create's options checked one by one and together,
info and cache stats in both output forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bootcache

from .conftest import (
    CLUSTER,
    MiB,
    cache_extension_fields,
    create_cache,
    make_base,
    qemu_check,
)
from .conftest import (
    bootcache as bootcache_cli,
)


@pytest.mark.parametrize("args", [
    ["--cache-quota", "0"],
    ["--cache-quota", "lots"],
    ["--cache-quota", "1M", "--cache-policy", "fifo"],
    ["--cache-quota", "1M", "--cache-on-stale", "ignore"],
    ["--cache-policy", "lru"],                              # no quota
    ["-o", "cache_policy=lru"],                             # no quota
    ["-o", "cache_img_quota=1M,cache_low_watermark=90,cache_high_watermark=80"],
    ["-o", "cache_img_quota=1M,cache_high_watermark=101"],
    ["-o", "cache_img_quota=1M,cache_quota_typo=3"],
])
def test_create_refuses_bad_cache_options(tmp_path: Path, args: list[str]) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    proc = bootcache_cli("create", "-f", "qcow2", *args, "-b", "base.raw", "-F", "raw",
                         tmp_path / "cache.qcow2", check=False)
    assert proc.returncode != 0, f"create accepted {args}"
    assert not (tmp_path / "cache.qcow2").exists() or \
        cache_extension_fields(tmp_path / "cache.qcow2") is None


def test_create_cache_needs_a_base(tmp_path: Path) -> None:
    proc = bootcache_cli("create", "-f", "qcow2", "--cache-quota", "1M",
                         tmp_path / "cache.qcow2", "1M", check=False)
    assert proc.returncode != 0
    assert not (tmp_path / "cache.qcow2").exists()


def test_sizes_take_suffixes(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    for text, value in (("100M", 100 * MiB), ("1G", 1 << 30), ("65536", CLUSTER),
                        ("1.5M", 3 * MiB // 2)):
        cache = tmp_path / f"cache-{text}.qcow2"
        create_cache(cache, "base.raw", quota=text)
        fields = cache_extension_fields(cache)
        assert fields is not None and fields["quota"] == value, (text, fields)
        assert qemu_check(cache)[0] == 0


def test_info_and_stats_outputs(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", policy="lru")
    with bootcache.open(str(cache)) as img:
        img.read(0, 3 * CLUSTER)
    human = bootcache_cli("info", cache).stdout.decode()
    assert "base.raw" in human
    assert ("cache" in human.lower() and "104857600" in human.replace(",", "")) or "100" in human
    info = json.loads(bootcache_cli("info", "--output", "json", cache).stdout)
    assert info["cache"]["policy"] == "lru"
    assert info["cache"]["used"] == 3 * CLUSTER
    stats = json.loads(bootcache_cli("cache", "stats", "--output", "json", cache).stdout)
    for key in ("hits", "misses", "bytes_from_base", "bytes_from_cache", "clusters_stored",
                "evictions", "used_bytes", "quota"):
        assert key in stats, key
    assert stats["bytes_from_base"] == 3 * CLUSTER
    human = bootcache_cli("cache", "stats", cache).stdout.decode()
    assert "bytes from base" in human.replace("_", " ")
    # Not a cache.
    bootcache_cli("create", "-q", "-f", "qcow2", tmp_path / "plain.qcow2", "1M")
    proc = bootcache_cli("cache", "stats", tmp_path / "plain.qcow2", check=False)
    assert proc.returncode != 0
    assert "cache" not in json.loads(
        bootcache_cli("info", "--output", "json", tmp_path / "plain.qcow2").stdout)
