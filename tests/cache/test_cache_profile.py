"""Issue 12, item 1: boot profiles in cache images.

A cache records the order in which it first fetched clusters (up to its
quota); `bootcache cache profile` exports it, `create --cache-profile` starts
a cache with one (from a profile file or a boot trace), bad profiles are
refused before anything is written, and QEMU ignores the profile: qemu-img
check stays clean and a QEMU header rewrite (qemu-img amend, a qemu-io
write) keeps its bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bootcache
from bootcache.qcow2 import profile_ext

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    QEMU_IO,
    MiB,
    assert_qemu_check,
    bootcache_info,
    cache_extension_fields,
    cached_clusters,
    create_cache,
    header_facts,
    make_base,
    qemu_convert_raw,
    run,
)
from .conftest import bootcache as bootcache_cli
from .test_spec_vectors import PROFILE_EXT, independent_profile


def profile_json(cache: Path) -> dict:
    doc: dict = json.loads(bootcache_cli("cache", "profile", "--output", "json", cache).stdout)
    return doc


def read_clusters(cache: Path, order: list[int], base: bytes) -> None:
    with bootcache.open(str(cache)) as img:
        for ci in order:
            assert img.read(ci * CLUSTER + 100, 5000) == base[ci * CLUSTER + 100:
                                                               ci * CLUSTER + 5100]


def test_cache_records_first_fetch_order(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=3)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    read_clusters(cache, [9, 2, 3, 4, 9, 40, 3, 5], base)
    read_clusters(cache, [41, 2, 1], base)  # a second session appends
    ranges = independent_profile(header_facts(cache)["extensions"][PROFILE_EXT])
    assert ranges["ranges"] == [[9, 1], [2, 3], [40, 1], [5, 1], [41, 1], [1, 1]]
    doc = profile_json(cache)
    assert doc["ranges"] == [[s * CLUSTER, n * CLUSTER] for s, n in ranges["ranges"]]
    assert doc["clusters"] == 8 and not doc["complete"]
    assert bootcache_info(cache)["cache"]["profile"]["clusters"] == 8
    assert_qemu_check(cache)


def test_recording_stops_at_the_quota(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=4)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=3 * CLUSTER)
    read_clusters(cache, [7, 8, 20, 30, 31, 2], base)
    doc = profile_json(cache)
    assert doc["ranges"] == [[7 * CLUSTER, 2 * CLUSTER], [20 * CLUSTER, CLUSTER]]
    assert doc["complete"] and not doc["truncated"]
    assert_qemu_check(cache)


def test_profile_round_trips_through_a_file_and_a_trace(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=5)
    first = tmp_path / "first.qcow2"
    create_cache(first, "base.raw", quota="100M")
    read_clusters(first, [12, 13, 0, 50], base)
    bootcache_cli("cache", "profile", first, "-o", tmp_path / "p.json")
    second = tmp_path / "second.qcow2"
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", "base.raw",
                  "-F", "raw", "--cache-profile", tmp_path / "p.json", second)
    assert profile_json(second)["ranges"] == profile_json(first)["ranges"]
    assert profile_json(second)["complete"]  # given, not recorded further
    # A trace (trace record's format) converts the same way.
    trace = tmp_path / "boot.trace"
    trace.write_text("# time_s offset length\n0.0 786432 70000\n0.5 4096 512\n"
                     "0.7 786432 4096\n0.9 3276800 65536\n")
    bootcache_cli("trace", "to-profile", trace, "--size", "4M", "-o", tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["ranges"] == [
        [12 * CLUSTER, 2 * CLUSTER], [0, CLUSTER], [50 * CLUSTER, CLUSTER]]
    third = tmp_path / "third.qcow2"
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", "base.raw",
                  "-F", "raw", "--cache-profile", trace, third)
    assert profile_json(third)["ranges"] == profile_json(first)["ranges"]
    for image in (second, third):
        assert_qemu_check(image)


BAD_PROFILES = {
    "wrong image size": ('{"format": "bootcache-profile", "version": 1, "virtual_size": 8388608,'
                         ' "ranges": [[0, 65536]]}', "8388608-byte disk"),
    "range outside the disk": ('{"format": "bootcache-profile", "version": 1, '
                               '"virtual_size": 4194304, "ranges": [[4128768, 131072]]}',
                               "outside the 4194304-byte disk"),
    "malformed JSON": ('{"format": "bootcache-profile", "version": 1, ', "invalid JSON"),
    "not a profile": ('{"format": "something else"}', "not a profile"),
    "malformed ranges": ('{"format": "bootcache-profile", "version": 1, '
                         '"virtual_size": 4194304, "ranges": [[0]]}', "[offset, length] pairs"),
    "negative range": ('{"format": "bootcache-profile", "version": 1, '
                       '"virtual_size": 4194304, "ranges": [[-65536, 65536]]}', "negative"),
    "unknown version": ('{"format": "bootcache-profile", "version": 7, "virtual_size": 4194304,'
                        ' "ranges": []}', "version 7"),
    "trace outside the disk": ("0.0 4194304 4096\n", "outside the 4194304-byte disk"),
    "garbled trace": ("0.0 zero 4096\n", "expected 'time_s offset length'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profiles_are_refused(case: str, tmp_path: Path) -> None:
    text, message = BAD_PROFILES[case]
    make_base(tmp_path / "base.raw", 4 * MiB, seed=6)
    bad = tmp_path / "bad.profile"
    bad.write_text(text)
    cache = tmp_path / "cache.qcow2"
    proc = bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b",
                         "base.raw", "-F", "raw", "--cache-profile", bad, cache, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr.decode(), proc.stderr
    assert "Traceback" not in proc.stderr.decode()
    assert not cache.exists()  # refused before anything was written


def test_imported_profile_keeps_a_quota_worth(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 4 * MiB, seed=7)
    trace = tmp_path / "boot.trace"
    trace.write_text("".join(f"0.0 {ci * CLUSTER} 4096\n" for ci in (30, 31, 5, 6, 7, 60)))
    cache = tmp_path / "cache.qcow2"
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", str(4 * CLUSTER), "-b",
                  "base.raw", "-F", "raw", "--cache-profile", trace, cache)
    assert profile_json(cache)["ranges"] == [[30 * CLUSTER, 2 * CLUSTER],
                                              [5 * CLUSTER, 2 * CLUSTER]]


def test_a_profile_larger_than_the_header_cluster_is_truncated(tmp_path: Path) -> None:
    """4 KiB clusters: the header cluster holds about a hundred scattered ranges."""
    make_base(tmp_path / "base.raw", 4 * MiB, seed=8)
    trace = tmp_path / "boot.trace"
    order = [ci for ci in range(0, 1024, 2)]  # 512 one-cluster ranges
    trace.write_text("".join(f"0.0 {ci * 4096} 4096\n" for ci in order))
    cache = tmp_path / "cache.qcow2"
    bootcache_cli("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "--cache-quota",
                  "100M", "-b", "base.raw", "-F", "raw", "--cache-profile", trace, cache)
    doc = profile_json(cache)
    assert doc["truncated"] and doc["complete"]
    kept = [r[0] // 4096 for r in doc["ranges"]]
    assert 0 < len(kept) < len(order) and kept == order[:len(kept)]  # the earliest kept
    data = header_facts(cache)["extensions"][PROFILE_EXT]
    assert independent_profile(data)["flags"] == 3
    assert_qemu_check(cache)
    # The cache can still record its identity (the longest allowed) and counters.
    with bootcache.open(str(cache)) as img:
        img.read(0, 4096)
    assert_qemu_check(cache)
    assert header_facts(cache)["extensions"][PROFILE_EXT] == data


def test_qemu_keeps_the_profile_across_header_rewrites(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=9)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    read_clusters(cache, [3, 4, 17, 1], base)
    profile = header_facts(cache)["extensions"][PROFILE_EXT]
    assert_qemu_check(cache)
    assert qemu_convert_raw(cache) == base
    # qemu-img amend rewrites the header; a qemu-io write rewrites it too (it
    # clears the cache's autoclear bit) and changes a cached cluster.
    run([QEMU_IMG, "amend", "-f", "qcow2", "-o", "lazy_refcounts=on", cache])
    assert header_facts(cache)["extensions"][PROFILE_EXT] == profile
    run([QEMU_IO, "-f", "qcow2", "-c", f"write -P 0x5a {3 * CLUSTER} 4096", cache])
    facts = header_facts(cache)
    assert facts["extensions"][PROFILE_EXT] == profile
    assert not facts["autoclear"] >> 63
    assert_qemu_check(cache)
    # bootcache revalidates (dropping the foreign write), keeps the profile, serves the base.
    with bootcache.open(str(cache)) as img:
        assert img.read(3 * CLUSTER, CLUSTER) == base[3 * CLUSTER:4 * CLUSTER]
    assert header_facts(cache)["extensions"][PROFILE_EXT] == profile
    assert cache_extension_fields(cache) is not None
    assert cached_clusters(cache) >= {4, 17, 1}
    assert_qemu_check(cache)


def test_a_malformed_profile_in_an_image_is_ignored_and_kept(tmp_path: Path) -> None:
    """Spec section 13: a reader ignores a profile it cannot decode; the image
    stays a usable cache, the bytes stay as they are, check warns."""
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=10)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    read_clusters(cache, [2], base)
    raw = bytearray(cache.read_bytes())
    data = header_facts(cache)["extensions"][PROFILE_EXT]
    at = bytes(raw[:CLUSTER]).index(data)
    raw[at + 20:at + 24] = (99).to_bytes(4, "big")  # range_count beyond the data
    cache.write_bytes(raw)
    broken = header_facts(cache)["extensions"][PROFILE_EXT]
    check = bootcache_cli("check", cache, check=False)
    assert check.returncode == 0 and b"profile" in check.stdout + check.stderr
    read_clusters(cache, [5, 2], base)
    assert header_facts(cache)["extensions"][PROFILE_EXT] == broken
    assert cached_clusters(cache) == {2, 5}
    assert_qemu_check(cache)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 40)), max_size=300),
       st.integers(200, 4000))
def test_encoding_round_trips_and_truncates_to_a_prefix(
        spans: list[tuple[int, int]], room: int) -> None:
    """bootcache's encoder against the independent decoder of section 13."""
    prof = profile_ext.from_byte_ranges(
        ((s * 4096, min(n, 4096 - s) * 4096) for s, n in spans), 4096 * 4096, 4096)
    whole = [list(r) for r in prof.ranges]
    data = prof.encode(room)
    assert len(data) <= room or not whole
    decoded = independent_profile(data)
    assert decoded["ranges"] == whole[:len(decoded["ranges"])]
    assert decoded["flags"] & 2 == (2 if len(decoded["ranges"]) < len(whole) else 0)
    assert decoded["clusters"] == sum(n for _, n in decoded["ranges"])
    assert profile_ext.Profile.decode(data).ranges == decoded["ranges"]


def test_small_clusters_leave_no_room_for_a_profile(tmp_path: Path) -> None:
    """2 KiB clusters: the header cluster cannot spare the room a profile needs.
    Creating one is refused; a cache without one serves and records nothing."""
    base = make_base(tmp_path / "base.raw", 1 * MiB, seed=11)
    trace = tmp_path / "boot.trace"
    trace.write_text("0.0 0 4096\n")
    cache = tmp_path / "cache.qcow2"
    args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=2048", "--cache-quota", "1M",
            "-b", "base.raw", "-F", "raw"]
    proc = bootcache_cli(*args, "--cache-profile", trace, cache, check=False)
    assert proc.returncode != 0 and b"no room for a profile" in proc.stderr, proc.stderr
    bootcache_cli(*args, cache)
    with bootcache.open(str(cache)) as img:
        assert img.read(4096, 8192) == base[4096:12288]
    assert PROFILE_EXT not in header_facts(cache)["extensions"]
    assert_qemu_check(cache)
