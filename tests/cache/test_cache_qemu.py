"""Acceptance 5: QEMU and cache images.

qemu-img check accepts them, qemu-img info shows the base as backing file,
QEMU reading a cache image gets the base's bytes, and after a QEMU writer
(``qemu-img amend``, ``qemu-io``) has opened it the extension survives, the
autoclear bit 63 is clear, and bootcache revalidates: it keeps clusters that
still hold the base's bytes and drops the ones a foreign writer changed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import bootcache

from .conftest import (
    AUTOCLEAR_CACHE,
    CLUSTER,
    EXT_CACHE,
    QEMU_IMG,
    MiB,
    assert_bytes,
    assert_qemu_check,
    bootcache_info,
    cache_extension_fields,
    cache_stats,
    cached_clusters,
    create_cache,
    header_facts,
    pattern_base,
    qemu_convert_raw,
    qemu_io,
    run,
)

SIZE = 4 * MiB
WARM = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 31, 63]


def pattern_of(ci: int) -> int:
    return ci % 251 + 1


def make_partly_warm(tmp_path: Path, **kw: str) -> tuple[Path, bytes]:
    base = pattern_base(tmp_path / "base.raw", SIZE)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", **kw)
    with bootcache.open(str(cache)) as img:
        for ci in WARM:
            assert_bytes(img.read(ci * CLUSTER, CLUSTER), base[ci * CLUSTER:(ci + 1) * CLUSTER],
                         f"warming {ci}")
    assert cached_clusters(cache) == set(WARM)
    return cache, base


def qemu_info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(
        run([QEMU_IMG, "info", "-U", "--output", "json", path]).stdout)
    return info


def test_check_and_info_empty_partial_warm(tmp_path: Path) -> None:
    base = pattern_base(tmp_path / "base.raw", SIZE)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    for stage in ("empty", "partial", "warm"):
        if stage == "partial":
            with bootcache.open(str(cache)) as img:
                img.read(CLUSTER + 17, 5 * CLUSTER)
        elif stage == "warm":
            with bootcache.open(str(cache)) as img:
                img.read(0, SIZE)
        report = assert_qemu_check(cache)
        assert report.get("leaks", 0) == 0, (stage, report)
        info = qemu_info(cache)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == SIZE
        assert info["backing-filename"] == "base.raw"
        assert info["backing-filename-format"] == "raw"
        assert info["full-backing-filename"] == str(tmp_path / "base.raw")
        assert_bytes(qemu_convert_raw(cache), base, f"qemu-img convert ({stage})")
        facts = header_facts(cache)
        assert facts["autoclear"] & AUTOCLEAR_CACHE, f"bit 63 clear after bootcache ({stage})"
        ours = bootcache_info(cache)
        assert ours["backing-filename"] == "base.raw"
        assert ours["cache"]["quota"] == 100 * MiB
        assert ours["cache"]["consistent"] is True


def test_qemu_io_reads_the_bases_bytes(tmp_path: Path) -> None:
    cache, _ = make_partly_warm(tmp_path)
    header_before = cache.read_bytes()[:CLUSTER]
    commands = []
    for ci in [0, 5, 9, 10, 11, 29, 30, 31, 40, 62, 63]:  # cached and not cached
        commands.append(f"read -P {pattern_of(ci):#x} {ci * CLUSTER} {CLUSTER}")
    commands.append(f"read -P {pattern_of(9):#x} {9 * CLUSTER + 100} 1000")
    commands.append(f"read -P {pattern_of(10):#x} {10 * CLUSTER} 512")
    qemu_io(cache, *commands, read_only=True)
    # A read-only QEMU leaves the image alone, bit 63 included.
    assert cache.read_bytes()[:CLUSTER] == header_before
    assert cached_clusters(cache) == set(WARM)


def test_overlay_made_by_qemu_over_a_cache(tmp_path: Path) -> None:
    cache, base = make_partly_warm(tmp_path)
    vm = tmp_path / "vm1.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "cache.qcow2", "-F", "qcow2", vm])
    assert_bytes(qemu_convert_raw(vm), base, "QEMU through vm1 -> cache -> base")
    with bootcache.open(str(vm)) as img:
        assert_bytes(img.read(0, SIZE), base, "bootcache through vm1 -> cache -> base")
    assert cached_clusters(cache) == set(range(SIZE // CLUSTER))
    assert_qemu_check(cache)


def test_amend_clears_bit_keeps_extension_and_bootcache_revalidates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, base = make_partly_warm(tmp_path, policy="lru")
    before = header_facts(cache)
    fields_before = cache_extension_fields(cache)
    assert before["autoclear"] & AUTOCLEAR_CACHE

    run([QEMU_IMG, "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", cache])
    after = header_facts(cache)
    assert EXT_CACHE in after["extensions"], "qemu-img amend dropped the cache extension"
    assert after["extensions"][EXT_CACHE] == before["extensions"][EXT_CACHE]
    assert not after["autoclear"] & AUTOCLEAR_CACHE, "QEMU must clear the unknown bit 63"
    assert bootcache_info(cache)["cache"]["consistent"] is False
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert after amend")

    caplog.set_level(logging.INFO, logger="bootcache")
    with bootcache.open(str(cache)) as img:
        assert "revalidat" in caplog.text.lower(), "bootcache did not say it revalidated"
        counted = img.layer.stats()["bytes_from_base"]  # type: ignore[attr-defined]
        for ci in WARM:
            off = ci * CLUSTER
            assert_bytes(img.read(off, CLUSTER), base[off:off + CLUSTER], f"cluster {ci}")
        # The clusters QEMU did not touch were proven good and kept.
        assert img.layer.stats()["bytes_from_base"] == counted  # type: ignore[attr-defined]
        assert_bytes(img.read(0, SIZE), base, "everything")
    fixed = header_facts(cache)
    assert fixed["autoclear"] & AUTOCLEAR_CACHE, "bootcache did not set bit 63 again"
    fields_after = cache_extension_fields(cache)
    assert fields_before is not None and fields_after is not None
    for key in ("quota", "policy", "high", "low", "on_stale"):
        assert fields_after[key] == fields_before[key], key
    assert bootcache_info(cache)["cache"]["consistent"] is True
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert after revalidation")


def test_junk_written_by_qemu_io_is_dropped(tmp_path: Path) -> None:
    cache, base = make_partly_warm(tmp_path)
    qemu_io(cache,
            f"write -P 0xab {3 * CLUSTER} {CLUSTER}",         # a cached cluster, all junk
            f"write -P 0xcd {30 * CLUSTER + 4096} 512",        # a cached cluster, 512 bytes
            f"write -P 0xef {20 * CLUSTER + 100} 4096",        # an uncached cluster
            f"write -z {5 * CLUSTER} {CLUSTER}",               # a zero cluster
            f"write -z {40 * CLUSTER} {2 * CLUSTER}")          # zero clusters, uncached
    assert not header_facts(cache)["autoclear"] & AUTOCLEAR_CACHE
    assert qemu_convert_raw(cache) != base  # the junk is there for QEMU to see

    with bootcache.open(str(cache)) as img:
        for ci in (3, 5, 20, 30, 40, 41):
            off = ci * CLUSTER
            assert_bytes(img.read(off, CLUSTER), base[off:off + CLUSTER], f"cluster {ci}")
        assert_bytes(img.read(0, SIZE), base, "everything")
    assert header_facts(cache)["autoclear"] & AUTOCLEAR_CACHE
    assert_qemu_check(cache, allow_leaks=True)
    # The junk is gone from the image itself: QEMU reads the base's bytes again.
    assert_bytes(qemu_convert_raw(cache), base, "qemu-img convert after bootcache")
    assert cache_stats(cache)["used_bytes"] <= 100 * MiB


def test_qemu_writers_are_refused_while_bootcache_holds_the_cache(tmp_path: Path) -> None:
    """Section 7 of the spec: one writer; QEMU writers are refused by the image lock."""
    cache, base = make_partly_warm(tmp_path)
    with bootcache.open(str(cache)) as img:
        img.read(0, CLUSTER)
        proc = qemu_io(cache, f"write -P 0xab 0 {CLUSTER}", check=False)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode != 0 and "lock" in out.lower(), out
        proc = run([QEMU_IMG, "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", cache],
                   check=False)
        assert proc.returncode != 0, "qemu-img amend ran on a cache held by bootcache"
        assert_bytes(img.read(0, SIZE), base, "still serving")
    assert header_facts(cache)["autoclear"] & AUTOCLEAR_CACHE
    assert_qemu_check(cache)
