"""Acceptance 4: the base's content is replaced (same size) under a warm cache.

The change is detected and no stale byte is served: with ``reset`` (the
default) the cache is dropped and refilled from the new base; with
``refuse`` opening (or serving) raises StaleBaseError.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

import bootcache
from bootcache.errors import StaleBaseError

from .conftest import (
    CLUSTER,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_extension_fields,
    cache_stats,
    cached_bytes,
    create_cache,
    make_base,
    qemu_convert_raw,
)

SIZE = 2 * MiB


def warm(cache: Path, base: bytes) -> None:
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, img.size), base, "warming")
    assert cached_bytes(cache) == len(base)


def overwrite_in_place(path: Path, new: bytes) -> None:
    """Same file, same inode and size, new content."""
    with open(path, "r+b") as f:
        f.write(new)


def replace_by_rename(path: Path, new: bytes) -> None:
    """A new file renamed over the old one, with the old mtime (only the inode differs)."""
    st = path.stat()
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(new)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


def change_one_cluster(path: Path, new: bytes) -> None:
    """Only cluster 5 changes (not one of the sampled blocks), in place."""
    with open(path, "r+b") as f:
        f.seek(5 * CLUSTER)
        f.write(new[5 * CLUSTER:6 * CLUSTER])


REPLACERS: dict[str, Callable[[Path, bytes], None]] = {
    "in-place": overwrite_in_place,
    "rename": replace_by_rename,
    "one-cluster": change_one_cluster,
}


def new_content(old: bytes, how: str) -> bytes:
    new = bytearray(random.Random(how).randbytes(len(old)))
    for off in range(0, len(new), 4096):
        new[off] |= 1
    if how == "one-cluster":
        return old[:5 * CLUSTER] + bytes(new[5 * CLUSTER:6 * CLUSTER]) + old[6 * CLUSTER:]
    return bytes(new)


@pytest.mark.parametrize("how", sorted(REPLACERS))
def test_reset_after_base_replaced(tmp_path: Path, how: str) -> None:
    old = make_base(tmp_path / "base.raw", SIZE, seed=41)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    warm(cache, old)
    new = new_content(old, how)
    REPLACERS[how](tmp_path / "base.raw", new)

    with bootcache.open(str(cache)) as img:
        # Cached ranges first (the old bytes are all in the cache), then all of it.
        assert_bytes(img.read(5 * CLUSTER, CLUSTER), new[5 * CLUSTER:6 * CLUSTER], "cluster 5")
        assert_bytes(img.read(0, SIZE), new, f"after the base changed ({how})")
        assert_bytes(img.read(0, SIZE), new, "again, from the refilled cache")
    stats = cache_stats(cache)
    assert stats["resets"] == 1, stats
    assert_qemu_check(cache)
    # The cache now holds the new base's bytes: QEMU reads them too.
    assert_bytes(qemu_convert_raw(cache), new, "qemu-img convert after the reset")

    # Reopening over the (unchanged) new base keeps the cache.
    before = stats["bytes_from_base"]
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, SIZE), new, "reopen")
    stats = cache_stats(cache)
    assert stats["resets"] == 1 and stats["bytes_from_base"] == before, stats


@pytest.mark.parametrize("how", ["in-place", "rename"])
def test_refuse_after_base_replaced(tmp_path: Path, how: str) -> None:
    old = make_base(tmp_path / "base.raw", SIZE, seed=42)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", on_stale="refuse")
    fields = cache_extension_fields(cache)
    assert fields is not None and fields["on_stale"] == 1
    warm(cache, old)
    REPLACERS[how](tmp_path / "base.raw", new_content(old, how))
    with pytest.raises(StaleBaseError):
        bootcache.open(str(cache))
    with pytest.raises(StaleBaseError):
        bootcache.open(str(cache))  # still refused: nothing was reset
    # The image is left as it was: still a valid qcow2 holding the old data.
    assert cached_bytes(cache) == SIZE
    assert cache_stats(cache)["resets"] == 0
    assert_qemu_check(cache)


def test_base_changes_while_open_reset(tmp_path: Path) -> None:
    """The base changes while the cache is open and warm: no stale byte afterwards.

    Half the disk is warm; the base is rewritten in place (new mtime); the next
    reads, first of a cold range then of the warm one, return the new bytes.
    """
    old = make_base(tmp_path / "base.raw", SIZE, seed=43)
    new = new_content(old, "in-place")
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    half = SIZE // 2
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, half), old[:half], "warming the first half")
        overwrite_in_place(tmp_path / "base.raw", new)
        assert_bytes(img.read(half, CLUSTER), new[half:half + CLUSTER], "a cold cluster")
        assert_bytes(img.read(0, SIZE), new, "everything, after the change")
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), new, "qemu-img convert")


@pytest.mark.parametrize("new_size", [SIZE // 2 + 512, SIZE + 3 * CLUSTER])
def test_base_size_changed(tmp_path: Path, new_size: int) -> None:
    """A base that shrank or grew: reset; past the base's end the disk reads zeros."""
    old = make_base(tmp_path / "base.raw", SIZE, seed=46)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    warm(cache, old)
    new = make_base(tmp_path / "base.raw", new_size, seed=47)
    expected = (new + bytes(SIZE))[:SIZE]
    with bootcache.open(str(cache)) as img:
        assert img.size == SIZE
        assert_bytes(img.read(0, SIZE), expected, "after the base's size changed")
        assert_bytes(img.read(0, SIZE), expected, "again")
    assert cache_stats(cache)["resets"] == 1
    assert_qemu_check(cache)
    assert_bytes(qemu_convert_raw(cache), expected, "qemu-img convert")


def test_refusing_cache_does_not_grow_per_read(tmp_path: Path) -> None:
    """on_stale=refuse, the base changes while serving: every later read fails
    with its own StaleBaseError, whose traceback stays short however many
    reads were refused before (a shared exception object would grow by two
    frames per raise, without bound while clients retry)."""
    old = make_base(tmp_path / "base.raw", SIZE, seed=48)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", on_stale="refuse")
    warm(cache, old)
    with bootcache.open(str(cache)) as img:
        overwrite_in_place(tmp_path / "base.raw", new_content(old, "in-place"))
        errors = []
        for _ in range(2000):
            with pytest.raises(StaleBaseError) as info:
                img.read(0, CLUSTER)
            errors.append(info.value)
        assert len({id(e) for e in errors}) == len(errors), "one exception object reused"
        depth = 0
        tb = errors[-1].__traceback__
        while tb is not None:
            depth += 1
            tb = tb.tb_next
        assert depth < 50, f"the last refusal carries {depth} frames"
