"""Acceptance 4, while the cache is open: the base's content changes under a
warm, open cache (a long-running server). No stale byte may be served once
the base changed; with ``refuse``, none after the refusal either.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bootcache
from bootcache.errors import StaleBaseError

from .conftest import CLUSTER, assert_bytes, create_cache, make_base
from .test_cache_stale import SIZE, new_content, overwrite_in_place


def test_base_changes_while_open_warm_reads(tmp_path: Path) -> None:
    """The base changes while the cache is open and fully warm; only hits follow.

    A long-running server whose cache is warm never misses again, so a
    check made only before fetches would never see the change.
    """
    old = make_base(tmp_path / "base.raw", SIZE, seed=44)
    new = new_content(old, "in-place")
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, SIZE), old, "warming")
        overwrite_in_place(tmp_path / "base.raw", new)
        assert_bytes(img.read(0, SIZE), new, "warm reads after the base changed")


def test_base_changes_while_open_refuse(tmp_path: Path) -> None:
    old = make_base(tmp_path / "base.raw", SIZE, seed=45)
    new = new_content(old, "in-place")
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M", on_stale="refuse")
    half = SIZE // 2
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, half), old[:half], "warming the first half")
        overwrite_in_place(tmp_path / "base.raw", new)
        with pytest.raises(StaleBaseError):
            img.read(half, CLUSTER)
        # Whatever the cache still serves must not be a stale byte.
        try:
            data = img.read(0, half)
        except StaleBaseError:
            pass
        else:
            assert_bytes(data, new[:half], "a warm read after the refusal")
