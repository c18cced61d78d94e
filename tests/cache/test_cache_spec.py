"""docs/spec/cache-image.md, checked from the outside: the extension's bytes,
the base identity (recomputed here from the spec's definition), counters that
survive restarts, the rules for readers (no backing file, unknown version,
unknown flags) and locking against a second writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest

import bootcache
from bootcache.errors import BootcacheError

from .conftest import (
    AUTOCLEAR_CACHE,
    CLUSTER,
    EXT_CACHE,
    QEMU_IMG,
    REPO,
    MiB,
    assert_bytes,
    bootcache_info,
    cache_extension_fields,
    cache_stats,
    cached_bytes,
    child_env,
    create_cache,
    header_facts,
    make_base,
    qemu_io,
    run,
)

READER = Path(__file__).with_name("reader.py")


def extension_offset(image: Path) -> int:
    """File offset of the cache extension's data."""
    raw = image.read_bytes()[:CLUSTER]
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        etype, elen = struct.unpack_from(">II", raw, pos)
        assert etype != 0, "no cache extension"
        if etype == EXT_CACHE:
            return pos + 8
        pos += 8 + (elen + 7) // 8 * 8


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def spec_hash_member() -> str:
    """The identity member that section 5 defines as the hash of sampled blocks."""
    spec = (REPO / "docs" / "spec" / "cache-image.md").read_text()
    m = re.search(r"^\|\s*`(\w+)`\s*\|\s*string\s*\|\s*SHA-256 \(hex\) over the decimal "
                  r"virtual size", spec, re.M)
    assert m, "docs/spec/cache-image.md section 5 no longer defines the sampled hash"
    return m[1]


def spec_sampled_hash(base: bytes) -> str:
    """Section 5: SHA-256 of the decimal size, then 4096 bytes at k*max(size/8, 1)."""
    size = len(base)
    h = hashlib.sha256(str(size).encode())
    step = max(size // 8, 1)
    for off in range(0, size, step):
        h.update(base[off:off + min(4096, size - off)])
    return h.hexdigest()


def test_new_cache_extension_as_specified(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB, seed=81)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", policy="lru", on_stale="refuse",
                 extra_opts="cache_high_watermark=90,cache_low_watermark=70")
    facts = header_facts(cache)
    assert facts["autoclear"] & AUTOCLEAR_CACHE
    assert len(facts["extensions"][EXT_CACHE]) >= 96
    fields = cache_extension_fields(cache)
    assert fields == {"version": 1, "flags": 0, "quota": 100 * MiB, "policy": 1, "high": 90,
                      "low": 70, "on_stale": 1, "hits": 0, "misses": 0, "bytes_from_base": 0,
                      "bytes_from_cache": 0, "clusters_stored": 0, "evictions": 0,
                      "used_bytes": 0, "resets": 0, "identity": {}}


def test_base_identity_matches_the_spec(tmp_path: Path) -> None:
    size = 3 * MiB + 4096
    base = make_base(tmp_path / "base.raw", size, seed=82)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    with bootcache.open(str(cache)) as img:
        img.read(0, 2 * CLUSTER)
    ident = cache_extension_fields(cache)["identity"]  # type: ignore[index]
    st = os.stat(tmp_path / "base.raw")
    assert ident["kind"] == "file"
    assert ident["virtual_size"] == size
    assert ident["size"] == st.st_size
    assert ident["inode"] == st.st_ino
    assert ident["mtime_ns"] == st.st_mtime_ns
    assert ident[spec_hash_member()] == spec_sampled_hash(base)
    info = bootcache_info(cache)["cache"]
    assert info["base-identity"] == ident
    assert info["used"] == cached_bytes(cache) == 2 * CLUSTER


def test_counters_survive_restarts(tmp_path: Path) -> None:
    size = 1 * MiB
    make_base(tmp_path / "base.raw", size, seed=83)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    with bootcache.open(str(cache)) as img:
        for off in range(0, size, CLUSTER):
            img.read(off, CLUSTER)
    first = cache_stats(cache)
    assert first["misses"] == size // CLUSTER
    assert first["bytes_from_base"] == size
    assert first["clusters_stored"] == size // CLUSTER
    assert first["used_bytes"] == size
    run([sys.executable, READER, "pass", cache, tmp_path / "base.raw"], env=child_env())
    second = cache_stats(cache)
    assert second["misses"] == first["misses"]
    assert second["hits"] >= first["hits"] + 1
    assert second["bytes_from_cache"] == first["bytes_from_cache"] + size
    assert second["bytes_from_base"] == size
    fields = cache_extension_fields(cache)
    assert fields is not None
    for key in ("hits", "misses", "bytes_from_base", "bytes_from_cache", "clusters_stored"):
        assert fields[key] == second[key], key


def test_unknown_version_is_not_used_as_a_cache(tmp_path: Path) -> None:
    """Section 2: with an unknown version the cache MUST NOT be used (plain qcow2 MAY)."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=85)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    patch(cache, extension_offset(cache), struct.pack(">I", 2))
    try:
        img = bootcache.open(str(cache))
    except BootcacheError:
        pass
    else:
        with img:
            assert_bytes(img.read(0, len(base)), base, "plain qcow2 reading")
    assert cached_bytes(cache) == 0, "a cache of unknown version was filled"
    assert cache_extension_fields(cache)["version"] == 2  # type: ignore[index]


def test_second_writer_is_refused(tmp_path: Path) -> None:
    """Section 7: one writer; another bootcache, QEMU readers not sharing write, refused."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=87)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    with bootcache.open(str(cache)) as img:
        img.read(0, CLUSTER)
        proc = run([sys.executable, READER, "pass", cache, tmp_path / "base.raw"],
                   env=child_env(), check=False)
        assert proc.returncode != 0, "a second bootcache process opened the cache"
        assert b"lock" in proc.stderr.lower(), proc.stderr[-2000:]
        with pytest.raises(BootcacheError):
            bootcache.open(str(cache))  # the same process, a second opener
        proc = run([QEMU_IMG, "info", "--output", "json", cache], check=False)
        assert proc.returncode != 0, "qemu-img info (without -U) opened a cache in use"
        proc = qemu_io(cache, "read 0 512", read_only=True, check=False)
        assert proc.returncode != 0 or b"lock" in (proc.stdout + proc.stderr).lower()
        # Reading the header without a lock still works.
        assert cache_stats(cache)["quota"] == 100 * MiB
        assert json.loads(run([QEMU_IMG, "info", "-U", "--output", "json", cache]).stdout)
        assert_bytes(img.read(0, len(base)), base, "the holder still serves")
