"""docs/spec/vectors: every vector decodes to its JSON file, in bootcache and in
an independent decoder written here from the spec's byte tables alone; qemu-img
accepts every vector; and the rules of spec 1.1 that the vectors and `info`
show (empty identity written with length 0, quota 0 refused, an unknown
version shown as plain qcow2, used bytes taken from the L2 tables).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    QEMU_IMG,
    REPO,
    MiB,
    cache_extension_fields,
    child_env,
    create_cache,
    make_base,
    run,
)
from .conftest import (
    bootcache as bootcache_cli,
)
from .test_cache_spec import extension_offset, patch

VECTORS = REPO / "docs" / "spec" / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))


def expected(name: str) -> dict[str, Any]:
    facts: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    facts.pop("description")
    return facts


# -- an independent decoder: struct and the spec only, no bootcache ---------------------

CACHE_EXT = 0x42434143
BACKING_FORMAT_EXT = 0xE2792ACA
PROFILE_EXT = 0x42435046


def _uleb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def independent_profile(ext: bytes) -> dict[str, Any]:
    """Section 13's byte table: the profile extension's fields, ranges in clusters."""
    version, flags, vsize, cbits, count, clusters = struct.unpack_from(">IIQB3xIQ", ext)
    out: dict[str, Any] = {"length": len(ext), "version": version}
    if version != 1:
        return out
    pos, prev_end, ranges = 32, 0, []
    for _ in range(count):
        delta, pos = _uleb128(ext, pos)
        length, pos = _uleb128(ext, pos)
        start = prev_end + (delta >> 1 if delta % 2 == 0 else -((delta + 1) >> 1))
        ranges.append([start, length + 1])
        prev_end = start + length + 1
    out.update(flags=flags, virtual_size=vsize, cluster_bits=cbits, range_count=count,
               clusters=clusters, ranges=ranges)
    return out


def independent_profile_usable(ext: bytes, image_size: int) -> bool:
    """Section 13's reader rules: version 1, the image's size, ranges inside the
    disk, no cluster twice, the clusters count right."""
    fields = independent_profile(ext)
    if fields["version"] != 1 or not 9 <= fields["cluster_bits"] <= 21:
        return False
    if fields["virtual_size"] != image_size:
        return False
    disk = -(-image_size // (1 << fields["cluster_bits"]))
    seen: set[int] = set()
    for start, n in fields["ranges"]:
        span = set(range(start, start + n))
        if start < 0 or start + n > disk or span & seen:
            return False
        seen |= span
    return len(seen) == fields["clusters"]


def independent_decode(path: Path) -> dict[str, Any]:
    """What section 2's byte table (and qcow2's header) says the image holds."""
    raw = path.read_bytes()
    assert raw[:4] == b"QFI\xfb"
    version, backing_off, backing_len, cluster_bits, size = struct.unpack_from(">IQIIQ", raw, 4)
    l1_size, l1_off = struct.unpack_from(">IQ", raw, 36)
    autoclear = struct.unpack_from(">Q", raw, 88)[0]
    header_length = struct.unpack_from(">I", raw, 100)[0]
    cs = 1 << cluster_bits
    exts: dict[int, bytes] = {}
    pos = header_length
    while pos + 8 <= cs:
        etype, elen = struct.unpack_from(">II", raw, pos)
        if etype == 0:
            break
        exts[etype] = raw[pos + 8:pos + 8 + elen]
        pos += 8 + (elen + 7) // 8 * 8  # data padded to a multiple of 8
    backing = raw[backing_off:backing_off + backing_len].decode() if backing_off else None
    fmt = exts[BACKING_FORMAT_EXT].decode() if BACKING_FORMAT_EXT in exts else None
    ext = exts.get(CACHE_EXT)
    prof: dict[str, Any] | None = None
    if PROFILE_EXT in exts:
        prof = independent_profile(exts[PROFILE_EXT])
        prof["usable"] = independent_profile_usable(exts[PROFILE_EXT], size)
    decoded: dict[str, Any] | None = None
    usable = False
    if ext is not None and backing is not None:
        ext_version = struct.unpack_from(">I", ext)[0]
        decoded = {"length": len(ext), "version": ext_version}
        if ext_version == 1:
            (flags, quota, policy, high, low, on_stale) = struct.unpack_from(">IQBBBB", ext, 4)
            counters = struct.unpack_from(">8Q", ext, 24)
            ident_len = struct.unpack_from(">I", ext, 88)[0]
            assert 96 + ident_len <= len(ext) and ident_len <= 1024
            ident = json.loads(ext[96:96 + ident_len]) if ident_len else {}
            decoded.update(flags=flags, quota=quota, policy=policy, high_watermark=high,
                           low_watermark=low, on_stale=on_stale, identity_length=ident_len,
                           identity=ident)
            decoded.update(zip(("hits", "misses", "bytes_from_base", "bytes_from_cache",
                                "clusters_stored", "evictions", "used_bytes", "resets"),
                               counters, strict=True))
            usable = quota > 0 and policy in (0, 1) and on_stale in (0, 1) and (
                policy == 0 or 0 < low <= high <= 100)
    # Allocated data clusters of the active L1 (section 6): a host offset or
    # the compressed bit, and the zero flag clear. No extended L2 here.
    used = 0
    for i in range(l1_size):
        l2_off = struct.unpack_from(">Q", raw, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        if l2_off:
            for j in range(cs // 8):
                entry = struct.unpack_from(">Q", raw, l2_off + 8 * j)[0]
                if entry & (0x00FFFFFFFFFFFE00 | 1 << 62) and not entry & 1:
                    used += cs
    return {
        "qcow2": {"version": version, "cluster_size": cs, "virtual_size": size,
                  "backing_file": backing, "backing_format": fmt,
                  "autoclear_bit63": bool(autoclear >> 63)},
        "cache_extension": decoded,
        "profile": prof,
        "used_bytes_from_l2": used,
        "usable_as_cache": usable,
    }


# -- bootcache's own decoding --------------------------------------------------------------

def bootcache_decode(path: Path) -> dict[str, Any]:
    from bootcache.qcow2 import cache_ext, profile_ext
    from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
    from bootcache.qcow2.image import Qcow2Image
    from bootcache.sources.file import FileSource

    async def decode() -> dict[str, Any]:
        source = FileSource(str(path))
        try:
            img = await Qcow2Image.open(source, name=str(path))
            h = img.header
            raw = h.find_extension(EXT_CACHE)
            decoded = cache_ext.fields(raw.data) if raw is not None else None
            raw_prof = h.find_extension(profile_ext.EXT_PROFILE)
            prof = profile_ext.fields(raw_prof.data, img.size) if raw_prof else None
            usable = False
            if raw is not None and h.backing_file is not None:
                try:
                    usable = not cache_ext.CacheExtension.decode(raw.data).problems()
                except cache_ext.ImageFormatError:
                    usable = False
            return {
                "qcow2": {"version": h.version, "cluster_size": h.cluster_size,
                          "virtual_size": img.size, "backing_file": h.backing_file,
                          "backing_format": h.backing_format,
                          "autoclear_bit63": bool(h.autoclear_features & AUTOCLEAR_CACHE)},
                "cache_extension": decoded,
                "profile": prof,
                "used_bytes_from_l2": len(await img.allocated_clusters()) * img.cs,
                "usable_as_cache": usable,
            }
        finally:
            await source.close()

    return asyncio.run(decode())


def test_there_are_vectors() -> None:
    assert len(NAMES) >= 5, NAMES
    assert sum(p.stat().st_size for p in VECTORS.iterdir()) < 384 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_bootcache_decodes_vector(name: str) -> None:
    assert bootcache_decode(VECTORS / f"{name}.qcow2") == expected(name)


@pytest.mark.parametrize("name", NAMES)
def test_independent_decoder_agrees(name: str) -> None:
    assert independent_decode(VECTORS / f"{name}.qcow2") == expected(name)


@pytest.mark.parametrize("name", [*NAMES, "base"])
def test_qemu_img_accepts_vector(name: str, tmp_path: Path) -> None:
    for f in VECTORS.glob("*.qcow2"):  # a copy: qemu-img must not touch the originals
        shutil.copy(f, tmp_path / f.name)
    image = tmp_path / f"{name}.qcow2"
    run([QEMU_IMG, "check", "-f", "qcow2", image])
    info = json.loads(run([QEMU_IMG, "info", "--output", "json", image]).stdout)
    assert info["virtual-size"] == 1 * MiB
    if name != "base":
        assert info["backing-filename"] == "base.qcow2"


def test_vectors_are_reproducible(tmp_path: Path) -> None:
    run([sys.executable, VECTORS / "make_vectors.py", tmp_path], env=child_env())
    for f in VECTORS.iterdir():
        if f.suffix in (".qcow2", ".json"):
            assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_sampled_hash_of_vectors_is_the_spec_formula(tmp_path: Path) -> None:
    """Section 5's byte-exact hash input, over the base's guest content."""
    run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", VECTORS / "base.qcow2",
         tmp_path / "base.raw"])
    content = (tmp_path / "base.raw").read_bytes()
    size = len(content)
    h = hashlib.sha256(str(size).encode("ascii"))
    for off in range(0, size, max(size // 8, 1)):
        h.update(content[off:off + min(4096, size - off)])
    ident = expected("filled-lru")["cache_extension"]["identity"]
    assert ident["content_sha256"] == h.hexdigest()


# -- behaviour that follows spec 1.1 --------------------------------------------------------

def test_new_cache_writes_empty_identity_with_length_0(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="1M")
    off = extension_offset(cache)
    raw = cache.read_bytes()
    assert struct.unpack_from(">I", raw, off - 4)[0] == 96  # extension length
    assert struct.unpack_from(">I", raw, off + 88)[0] == 0  # identity_length


@pytest.mark.parametrize("opts", [["--cache-quota", "0"], ["-o", "cache_img_quota=0"]])
def test_quota_0_is_refused_at_creation(tmp_path: Path, opts: list[str]) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    proc = bootcache_cli("create", "-f", "qcow2", *opts, "-b", "base.raw", "-F", "raw",
                         tmp_path / "c.qcow2", check=False)
    assert proc.returncode != 0
    assert b"quota" in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr


def test_quota_0_is_refused_by_the_encoder() -> None:
    from bootcache.errors import ImageFormatError
    from bootcache.qcow2.cache_ext import CacheExtension

    with pytest.raises(ImageFormatError, match="quota"):
        CacheExtension(quota=0).encode()


def test_check_flags_quota_0(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="1M")
    patch(cache, extension_offset(cache) + 8, struct.pack(">Q", 0))
    proc = bootcache_cli("check", "--output", "json", cache, check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["corruptions"] == 1
    human = bootcache_cli("check", cache, check=False)
    assert b"quota is 0" in human.stdout + human.stderr
    # qemu-img sees nothing wrong: the qcow2 structures are fine.
    run([QEMU_IMG, "check", cache])


def test_info_takes_used_bytes_from_the_l2_tables(tmp_path: Path) -> None:
    shutil.copytree(VECTORS, tmp_path / "v")
    image = tmp_path / "v" / "filled-lru.qcow2"
    patch(image, extension_offset(image) + 72, struct.pack(">Q", 5))
    proc = bootcache_cli("info", "--output", "json", image)
    info = json.loads(proc.stdout)
    assert info["cache"]["used"] == 4 * 4096
    assert info["cache"]["used-recorded"] == 5
    assert any("used_bytes=5" in w for w in info["warnings"])
    human = bootcache_cli("info", image)
    assert b"used: 16384" in human.stdout
    assert b"warning" in human.stderr and b"used_bytes=5" in human.stderr


def test_info_shows_unknown_version_as_plain_qcow2(tmp_path: Path) -> None:
    shutil.copytree(VECTORS, tmp_path / "v")
    image = tmp_path / "v" / "unknown-version.qcow2"
    proc = bootcache_cli("info", "--output", "json", image)
    info = json.loads(proc.stdout)
    assert info["format"] == "qcow2" and "cache" not in info
    assert any("version 2" in w for w in info["warnings"])
    human = bootcache_cli("info", image)
    assert b"backing file: base.qcow2" in human.stdout and b"version 2" in human.stderr
    check = bootcache_cli("check", image)
    assert b"version 2" in check.stdout


def test_legacy_empty_identity_reads_as_empty(tmp_path: Path) -> None:
    shutil.copytree(VECTORS, tmp_path / "v")
    image = tmp_path / "v" / "legacy-empty-identity.qcow2"
    info = json.loads(bootcache_cli("info", "--output", "json", image).stdout)
    assert info["cache"]["base-identity"] == {}
    assert "warnings" not in info
    fields = cache_extension_fields(image)
    assert fields is not None and fields["identity"] == {}


def test_watermarks_are_ignored_under_stop() -> None:
    from bootcache.qcow2.cache_ext import POLICY_STOP, CacheExtension

    data = CacheExtension(quota=1 << 20, policy=POLICY_STOP).encode()
    data = data[:17] + bytes([0, 200]) + data[19:]  # nonsense watermarks
    ext = CacheExtension.decode(data)
    assert ext.problems() == []
    assert (ext.high_watermark, ext.low_watermark) == (0, 200)
