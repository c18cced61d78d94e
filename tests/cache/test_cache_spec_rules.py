"""docs/spec/cache-image.md, section 2 rules for readers and writers: unknown
flag bits are preserved; the extension is ignored without a backing file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import bootcache

from .conftest import (
    CLUSTER,
    EXT_CACHE,
    QEMU_IMG,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_extension_fields,
    cached_bytes,
    create_cache,
    header_facts,
    make_base,
    run,
)
from .test_cache_spec import extension_offset, patch


def test_unknown_flags_are_preserved(tmp_path: Path) -> None:
    """Section 2: flags - readers ignore unknown bits, writers preserve them."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=84)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    patch(cache, extension_offset(cache) + 4, struct.pack(">I", 0x80000001))
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, len(base)), base, "with unknown flags")
    fields = cache_extension_fields(cache)
    assert fields is not None and fields["flags"] == 0x80000001, fields
    assert cached_bytes(cache) == len(base)


def test_extension_without_backing_file_is_ignored(tmp_path: Path) -> None:
    """Section 2: the extension MUST be treated as absent without a backing file."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=86)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    with bootcache.open(str(cache)) as img:
        img.read(0, 4 * CLUSTER)
    run([QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-b", "", cache])
    assert EXT_CACHE in header_facts(cache)["extensions"]
    with bootcache.open(str(cache)) as img:
        data = img.read(0, len(base))
    # A plain qcow2 without backing file: cached clusters, then zeros.
    assert_bytes(data, base[:4 * CLUSTER] + bytes(len(base) - 4 * CLUSTER), "plain read")
    assert_qemu_check(cache)
