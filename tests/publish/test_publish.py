"""``bootcache cache publish`` and ``pull`` with local files: the artifact is a
qcow2 that qemu-img accepts and reads as the cache; a pulled cache is a normal
cache that qemu-img accepts, serves warm (nothing read from the base), and
bad input is refused with nothing half-written left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from cache.conftest import (
    AUTOCLEAR_CACHE,
    EXT_CACHE,
    QEMU_IO,
    QEMU_WRITE_LOCK_BYTE,
    Nbdkit,
    assert_qemu_check,
    cache_extension_fields,
    cache_stats,
    create_cache,
    header_facts,
    make_base,
    ofd_locked,
    qemu_convert_raw,
    wait_for,
)

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    TRACE_RUNS,
    MiB,
    bootcache,
    leftovers,
    run,
    served,
    warm,
    write_trace,
)

EXT_DIGEST = 0x42435044
#: Stands in for a boot profile: an extension publish knows nothing of.
EXT_OTHER = 0x50524F46


def text_base(path: Path, size: int, seed: int) -> bytes:
    """A base that compresses, as real disk content does (random bytes do not)."""
    r = random.Random(seed)
    words = [bytes(r.choice(b"abcdefghijklmnop \n") for _ in range(r.randint(2, 12)))
             for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += r.choice(words)
    path.write_bytes(bytes(out[:size]))
    return bytes(out[:size])


def add_extension(image: Path, ext_type: int, data: bytes) -> None:
    """Add a header extension with bootcache's engine (as a profile writer would)."""
    from bootcache.qcow2.image import Qcow2Image
    from bootcache.sources.file import FileSource

    async def go() -> None:
        img = await Qcow2Image.open(FileSource(str(image), writable=True), writable=True,
                                    keep_autoclear=AUTOCLEAR_CACHE)
        img.header.set_extension(ext_type, data)
        await img.rewrite_header()
        await img.close()

    asyncio.run(go())


@pytest.fixture
def warm_cache(tmp_path: Path) -> tuple[Path, bytes]:
    """A cache warmed by a boot-like read pattern over a compressible local base."""
    base = text_base(tmp_path / "base.raw", 48 * MiB, seed=5)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="32M")
    reads = write_trace(tmp_path / "boot.trace")
    warm(cache, reads)
    add_extension(cache, EXT_OTHER, b"profile bytes, kept verbatim\0\x01\x02")
    return cache, base


def test_artifact_is_a_qcow2_qemu_reads_as_the_cache(tmp_path: Path,
                                                     warm_cache: tuple[Path, bytes]) -> None:
    cache, _ = warm_cache
    art = tmp_path / "published.qcow2"
    out = json.loads(bootcache("cache", "publish", "--output", "json", cache, art).stdout)
    report = assert_qemu_check(art)
    cached = sum(n for _, n in {(f, n) for f, n in TRACE_RUNS if (f, n) != (41, 1)})
    assert report["allocated-clusters"] == cached == out["clusters"]
    assert report["compressed-clusters"] == cached, report
    info = json.loads(run([QEMU_IMG, "info", "--output", "json", art]).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert info["backing-filename"] == "base.raw"
    # QEMU reads the artifact as the same disk as the cache and the base.
    run([QEMU_IMG, "compare", art, cache])
    run([QEMU_IMG, "compare", "-F", "raw", art, tmp_path / "base.raw"])
    # It travels small: the cached data compressed.
    assert out["artifact-bytes"] < 0.5 * out["raw-bytes"], out
    assert os.path.getsize(art) == out["artifact-bytes"]
    # The cache's extensions ride along verbatim; the digest is added.
    theirs, ours = header_facts(cache)["extensions"], header_facts(art)["extensions"]
    assert ours[EXT_OTHER] == theirs[EXT_OTHER]
    assert ours[EXT_CACHE] == theirs[EXT_CACHE]
    assert len(ours[EXT_DIGEST]) == 88
    assert leftovers(tmp_path) == []


def test_pulled_cache_is_a_normal_cache(tmp_path: Path, warm_cache: tuple[Path, bytes]) -> None:
    cache, base = warm_cache
    art = tmp_path / "published.qcow2"
    bootcache("cache", "publish", cache, art)
    pulled = tmp_path / "pulled.qcow2"
    bootcache("cache", "pull", art, pulled)
    report = assert_qemu_check(pulled)
    assert report.get("compressed-clusters", 0) == 0
    run([QEMU_IMG, "compare", pulled, cache])
    assert qemu_convert_raw(pulled) == base
    mine, theirs = cache_extension_fields(pulled), cache_extension_fields(cache)
    assert mine is not None and theirs is not None
    for key in ("quota", "policy", "on_stale", "identity", "used_bytes"):
        assert mine[key] == theirs[key], key
    assert mine["hits"] == mine["misses"] == mine["bytes_from_base"] == 0
    facts = header_facts(pulled)
    assert facts["autoclear"] & AUTOCLEAR_CACHE
    assert facts["extensions"][EXT_OTHER] == header_facts(cache)["extensions"][EXT_OTHER]
    assert EXT_DIGEST not in facts["extensions"]
    assert bootcache("check", pulled).returncode == 0
    assert leftovers(tmp_path) == []
    # It is writable and keeps filling: a read past the cached set is stored.
    warm(pulled, [(200 * CLUSTER, 4096)])
    assert cache_extension_fields(pulled)["used_bytes"] == theirs["used_bytes"] + CLUSTER
    assert_qemu_check(pulled)


def test_pulled_cache_boots_without_touching_the_base(tmp_path: Path, sockdir: str) -> None:
    """The base behind nbdkit's log filter: a replay of the boot trace through
    ``bootcache serve`` of a pulled cache reads nothing from it."""
    make_base(tmp_path / "base.raw", 40 * MiB, seed=3)
    kit = Nbdkit(tmp_path / "base.raw", sockdir)
    try:
        node_a, node_b = tmp_path / "a", tmp_path / "b"
        node_a.mkdir()
        node_b.mkdir()
        trace = tmp_path / "boot.trace"
        reads = write_trace(trace)
        cache = node_a / "cache.qcow2"
        create_cache(cache, kit.uri, quota="16M")
        with served(cache, sockdir, tmp_path / "serve-a.log") as uri:
            bootcache("trace", "replay", uri, trace)
        bootcache("cache", "publish", cache, node_a / "published.qcow2")
        pulled = node_b / "cache.qcow2"
        bootcache("cache", "pull", node_a / "published.qcow2", pulled)
        with served(pulled, sockdir, tmp_path / "serve-b.log") as uri:
            before = len(kit.reads())  # opening samples the base for its identity
            bootcache("trace", "replay", uri, trace)
            during = kit.reads()[before:]
        assert during == [], f"the pulled cache read the base: {during[:5]}"
        stats = cache_stats(pulled)
        assert stats["bytes_from_base"] == 0 and stats["misses"] == 0, stats
        assert stats["hits"] == len(reads), stats
    finally:
        kit.stop()


def test_pull_refuses_another_base(tmp_path: Path, warm_cache: tuple[Path, bytes]) -> None:
    cache, _ = warm_cache
    art = tmp_path / "published.qcow2"
    bootcache("cache", "publish", cache, art)
    other = tmp_path / "other"
    other.mkdir()
    text_base(other / "base.raw", 48 * MiB, seed=6)  # same name and size, other content
    proc = bootcache("cache", "pull", art, other / "cache.qcow2", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "another base" in err and "content_sha256" in err, err
    assert list(other.iterdir()) == [other / "base.raw"]
    # -b names the base: the very file the cache was filled from is accepted.
    bootcache("cache", "pull", "-b", tmp_path / "base.raw", art, other / "cache.qcow2")
    run([QEMU_IMG, "compare", other / "cache.qcow2", cache])


def corrupt(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["data", "l2", "header", "truncated", "appended"])
def test_pull_refuses_a_damaged_artifact(tmp_path: Path, warm_cache: tuple[Path, bytes],
                                         damage: str) -> None:
    cache, _ = warm_cache
    art = tmp_path / "published.qcow2"
    bootcache("cache", "publish", cache, art)
    size = art.stat().st_size
    if damage == "data":
        corrupt(art, size - 3 * CLUSTER + 100)
    elif damage == "l2":
        raw = art.read_bytes()
        l1 = int.from_bytes(raw[40:48], "big")
        l2 = int.from_bytes(raw[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
        corrupt(art, l2 + 8 * 17 + 7)  # the offset of guest cluster 17's data
    elif damage == "header":
        ext = header_facts(art)["extensions"][EXT_CACHE]
        corrupt(art, art.read_bytes().index(ext) + 100)  # a byte of the base identity
    elif damage == "truncated":
        os.truncate(art, size - 5000)
    else:
        with open(art, "ab") as f:
            f.write(b"\0" * 512)
    pulled = tmp_path / "pulled.qcow2"
    proc = bootcache("cache", "pull", art, pulled, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("bootcache: ") and "Traceback" not in err, err
    assert not pulled.exists()
    assert leftovers(tmp_path) == []


def test_publish_and_pull_refuse_bad_destinations(tmp_path: Path,
                                                  warm_cache: tuple[Path, bytes]) -> None:
    cache, _ = warm_cache
    proc = bootcache("cache", "publish", cache, tmp_path / "missing" / "a.qcow2", check=False)
    assert proc.returncode == 1 and "cannot write" in proc.stderr.decode(), proc.stderr
    art = tmp_path / "published.qcow2"
    bootcache("cache", "publish", cache, art)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = bootcache("cache", "pull", art, blocker / "cache.qcow2", check=False)
    assert proc.returncode == 1 and "cannot write" in proc.stderr.decode(), proc.stderr
    # An existing cache is never replaced.
    proc = bootcache("cache", "pull", art, cache, check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr.decode(), proc.stderr
    # Not a cache: a plain qcow2 is not published.
    plain = tmp_path / "plain.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", plain, "1M"])
    proc = bootcache("cache", "publish", plain, tmp_path / "x.qcow2", check=False)
    assert proc.returncode == 1 and "not a cache image" in proc.stderr.decode(), proc.stderr
    # Not an artifact: a cache is not pulled as one.
    proc = bootcache("cache", "pull", cache, tmp_path / "y.qcow2", check=False)
    assert proc.returncode == 1 and "not a published cache" in proc.stderr.decode()
    assert leftovers(tmp_path) == []


def test_publish_of_a_served_cache_goes_through_its_daemon(
        tmp_path: Path, warm_cache: tuple[Path, bytes], sockdir: str) -> None:
    """The daemon holds a served cache's lock, so `cache publish` asks the
    daemon (through the control socket it links beside the cache) to publish
    it; guests keep reading meanwhile, and what it publishes pulls into a cache
    that reads as the base."""
    cache, base = warm_cache
    art = tmp_path / "a.qcow2"
    with served(cache, sockdir, tmp_path / "serve.log") as uri:
        assert os.path.islink(f"{cache}.ctl")
        # A guest read past the warm set while the publish runs: the daemon
        # keeps serving (and storing) beside it.
        reader = subprocess.Popen([QEMU_IMG, "convert", "-f", "raw", "-O", "raw", uri,
                                   tmp_path / "guest.raw"])
        out = json.loads(bootcache("cache", "publish", "--output", "json", cache,
                                   os.path.relpath(art)).stdout)
        assert reader.wait(120) == 0
        assert (tmp_path / "guest.raw").read_bytes() == base
        # Refusals come back from the daemon, whole, and leave nothing behind.
        proc = bootcache("cache", "publish", cache, tmp_path / "missing" / "b.qcow2",
                         check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "daemon refused" in err and "cannot write" in err, err
        assert "Traceback" not in err
    assert "published" in (tmp_path / "serve.log").read_text()
    assert out["artifact-bytes"] == os.path.getsize(art) and out["clusters"] > 0
    assert_qemu_check(art)
    run([QEMU_IMG, "compare", "-F", "raw", art, tmp_path / "base.raw"])
    pulled = tmp_path / "pulled.qcow2"
    bootcache("cache", "pull", art, pulled)
    assert qemu_convert_raw(pulled) == base
    assert leftovers(tmp_path) == []


def test_publish_refuses_a_cache_locked_by_another_writer(
        tmp_path: Path, warm_cache: tuple[Path, bytes]) -> None:
    """No daemon to ask (no control link): a cache another writer holds is
    refused by its lock, as before."""
    cache, _ = warm_cache
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", cache], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def holding() -> bool:
        assert holder.poll() is None, holder.communicate()[1]
        return ofd_locked(cache, QEMU_WRITE_LOCK_BYTE)

    try:
        # qemu-io holds the image (and its write lock) until it quits.
        wait_for(holding, 30, "qemu-io's write lock")
        proc = bootcache("cache", "publish", cache, tmp_path / "a.qcow2", check=False)
    finally:
        holder.communicate(b"quit\n", timeout=30)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "lock" in err.lower(), err
    assert not (tmp_path / "a.qcow2").exists()


def reseal(path: Path) -> None:
    """Recompute an artifact's file_sha256 after editing it, so that only the
    reader's other checks can catch the edit."""
    raw = bytearray(path.read_bytes())
    digest = header_facts(path)["extensions"][EXT_DIGEST]
    at = bytes(raw).index(digest) + 24
    raw[at:at + 32] = bytes(32)
    raw[at:at + 32] = hashlib.sha256(bytes(raw)).digest()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("edit", ["zero-flag", "over-quota", "content", "moved", "backwards"])
def test_pull_refuses_a_resealed_artifact(tmp_path: Path, warm_cache: tuple[Path, bytes],
                                          edit: str) -> None:
    """Edits whose file digest was recomputed: the structure checks and the
    content digest still refuse them."""
    cache, _ = warm_cache
    art = tmp_path / "published.qcow2"
    bootcache("cache", "publish", cache, art)
    raw = bytearray(art.read_bytes())
    l1 = int.from_bytes(raw[40:48], "big")
    l2 = int.from_bytes(raw[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    entry = l2 + 8 * 17  # guest cluster 17, cached
    if edit == "zero-flag":
        raw[entry:entry + 8] = (1 | 1 << 63 | 0x10000).to_bytes(8, "big")
        expect = "not a data cluster"
    elif edit == "over-quota":
        ext = header_facts(art)["extensions"][EXT_CACHE]
        at = bytes(raw).index(ext) + 8
        raw[at:at + 8] = (CLUSTER).to_bytes(8, "big")  # quota: one cluster
        expect = "over its quota"
    elif edit == "content":
        e = int.from_bytes(raw[entry:entry + 8], "big")
        host = e & ((1 << 54) - 1)
        raw[host + 20] ^= 0x01  # inside the zstd frame of cluster 17
        expect = "compressed cluster|content_sha256"
    elif edit == "moved":  # cluster 17's data now claims to be cluster 16's (not cached)
        raw[entry:entry + 8], raw[entry - 8:entry] = raw[entry - 8:entry], raw[entry:entry + 8]
        # Only the content digest ties data to guest offsets, and a reader skips
        # it when the frames carry checksums (spec 14.2): clear that flag, as an
        # artifact of an earlier publisher has it.
        flags_at = bytes(raw).index(header_facts(art)["extensions"][EXT_DIGEST]) + 4
        raw[flags_at:flags_at + 4] = bytes(4)
        expect = "content_sha256"
    else:  # clusters 17 and 18 swap their data: 18's now lies before 17's
        raw[entry:entry + 8], raw[entry + 8:entry + 16] = \
            raw[entry + 8:entry + 16], raw[entry:entry + 8]
        expect = "out of order"
    art.write_bytes(bytes(raw))
    reseal(art)
    pulled = tmp_path / "pulled.qcow2"
    proc = bootcache("cache", "pull", art, pulled, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and re.search(expect, err), err
    assert "Traceback" not in err
    assert not pulled.exists() and leftovers(tmp_path) == []
