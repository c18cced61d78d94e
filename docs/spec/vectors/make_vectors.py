"""Make the cache-image test vectors of docs/spec/cache-image.md (sections 11, 13).

    python docs/spec/vectors/make_vectors.py [FOLDER]

Writes base.qcow2, the cache images and one JSON file per cache image with the
fields a reader following the spec decodes from it. Deterministic: running it
again gives the same bytes. The cache and profile extensions are built here
with struct, straight from the spec's byte tables, so that the vectors do not
depend on bootcache's encoders; bootcache only lays out the qcow2 structures.

The images are small on purpose: 1 MiB virtual size, 4 KiB clusters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from bootcache.qcow2.create import CreateOptions, create_qcow2
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

EXT_PROFILE = 0x42435046  # "BCPF", section 13
PROFILE_FIXED = struct.Struct(">IIQB3sIQ")  # section 13, bytes 0 - 31

SIZE = 1 << 20
CLUSTER = 4096
BIT63 = 1 << 63
FIXED = struct.Struct(">IIQBBBB4sQQQQQQQQI4s")  # section 2, bytes 0 - 95

#: Guest clusters of the base that hold data (the rest reads as zeros).
BASE_CLUSTERS = (0, 1, 2, 100, 255)


def base_cluster(k: int) -> bytes:
    """Deterministic, incompressible-looking content of base cluster ``k``."""
    seed = hashlib.sha256(f"bootcache vector base cluster {k}".encode()).digest()
    return (seed * (CLUSTER // len(seed)))[:CLUSTER]


def base_content() -> bytes:
    data = bytearray(SIZE)
    for k in BASE_CLUSTERS:
        data[k * CLUSTER:(k + 1) * CLUSTER] = base_cluster(k)
    return bytes(data)


def content_sha256(content: bytes) -> str:
    """Section 5: the sampled hash, computed from its byte-exact definition."""
    size = len(content)
    h = hashlib.sha256(str(size).encode("ascii"))
    step = max(size // 8, 1)
    for off in range(0, size, step):
        h.update(content[off:off + min(4096, size - off)])
    return h.hexdigest()


def extension(*, version: int = 1, flags: int = 0, quota: int, policy: int = 0,
              high: int = 95, low: int = 80, on_stale: int = 0,
              counters: tuple[int, ...] = (0,) * 8,
              identity: bytes = b"", reserved: bytes = bytes(4), tail: bytes = b"") -> bytes:
    """The extension's data, field by field as the spec's table lists them."""
    return FIXED.pack(version, flags, quota, policy, high, low, on_stale, reserved, *counters,
                      len(identity), reserved) + identity + tail


def uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def profile(ranges: list[tuple[int, int]], *, flags: int = 0, version: int = 1,
            virtual_size: int = SIZE, cluster_bits: int = 12, count: int | None = None,
            reserved: bytes = bytes(3), tail: bytes = b"") -> bytes:
    """The profile extension's data as section 13's table lists it."""
    body, prev_end = b"", 0
    for start, n in ranges:
        delta = start - prev_end
        body += uleb128(delta * 2 if delta >= 0 else -delta * 2 - 1) + uleb128(n - 1)
        prev_end = start + n
    return PROFILE_FIXED.pack(version, flags, virtual_size, cluster_bits, reserved,
                              len(ranges), sum(n for _, n in ranges) if count is None else count
                              ) + body + tail


def profile_fields(ext: bytes, ranges: list[tuple[int, int]], usable: bool) -> dict[str, Any]:
    version, flags, vsize, cbits, _, nranges, clusters = PROFILE_FIXED.unpack_from(ext)
    return {"length": len(ext), "version": version, "flags": flags, "virtual_size": vsize,
            "cluster_bits": cbits, "range_count": nranges, "clusters": clusters,
            "ranges": [list(r) for r in ranges], "usable": usable}


def identity_json(ident: dict[str, Any]) -> bytes:
    return json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()


async def write_clusters(path: Path, clusters: dict[int, bytes]) -> None:
    source = FileSource(str(path), writable=True)
    try:
        img = await Qcow2Image.open(source, writable=True, keep_autoclear=AUTOCLEAR_CACHE,
                                    name=str(path))
        for k in sorted(clusters):
            await img.pwrite(k * CLUSTER, clusters[k])
        await img.flush()
        await img.close()
    finally:
        await source.close()


def make_image(path: Path, *, backing: str | None, ext: bytes | None, autoclear: int,
               clusters: dict[int, bytes], prof: bytes | None = None) -> None:
    if path.exists():
        path.unlink()
    exts: tuple[tuple[int, bytes], ...] = ((EXT_CACHE, ext),) if ext is not None else ()
    if prof is not None:
        exts += ((EXT_PROFILE, prof),)
    opts = CreateOptions(cluster_size=CLUSTER, backing_file=backing,
                         backing_fmt="qcow2" if backing else None,
                         extensions=exts, autoclear=autoclear)
    create_qcow2(str(path), SIZE, opts)
    if clusters:
        asyncio.run(write_clusters(path, clusters))


def expected(description: str, *, ext: dict[str, Any] | None, autoclear: int,
             used_clusters: int, usable: bool, backing: str | None = "base.qcow2",
             prof: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "qcow2": {"version": 3, "cluster_size": CLUSTER, "virtual_size": SIZE,
                  "backing_file": backing, "backing_format": "qcow2" if backing else None,
                  "autoclear_bit63": bool(autoclear & BIT63)},
        "cache_extension": ext,
        "profile": prof,
        # Derived facts: used bytes from the L2 tables (section 6), and whether
        # a reader may use the image as a cache at all (sections 2 and 10).
        "used_bytes_from_l2": used_clusters * CLUSTER,
        "usable_as_cache": usable,
    }


def fields(ext: bytes, identity: dict[str, Any]) -> dict[str, Any]:
    """The decoded fields of an extension of version 1, under the spec's names."""
    (version, flags, quota, policy, high, low, on_stale, _, hits, misses, from_base, from_cache,
     stored, evictions, used, resets, ident_len, _) = FIXED.unpack_from(ext)
    return {"length": len(ext), "version": version, "flags": flags, "quota": quota,
            "policy": policy, "high_watermark": high, "low_watermark": low,
            "on_stale": on_stale, "hits": hits, "misses": misses,
            "bytes_from_base": from_base, "bytes_from_cache": from_cache,
            "clusters_stored": stored, "evictions": evictions, "used_bytes": used,
            "resets": resets, "identity_length": ident_len, "identity": identity}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    content = base_content()
    make_image(out / "base.qcow2", backing=None, ext=None, autoclear=0,
               clusters={k: base_cluster(k) for k in BASE_CLUSTERS})
    base_file_size = (out / "base.qcow2").stat().st_size
    vectors: dict[str, tuple[bytes | None, int, dict[int, bytes], dict[str, Any]]] = {}
    profiles: dict[str, bytes] = {}

    ext = extension(quota=512 * 1024)
    vectors["new"] = (ext, BIT63, {}, expected(
        "A cache image as created: stop policy, nothing cached, identity not recorded "
        "(length 0), bit 63 set.",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=0, usable=True))

    # Illustrative file facts (a real reader would see other inode and mtime
    # values, and reset or refuse); the sampled hash is the real one.
    ident = {"content_sha256": content_sha256(content), "inode": 1234, "kind": "file",
             "mtime_ns": 1700000000000000000, "size": base_file_size, "virtual_size": SIZE}
    raw_ident = identity_json(ident)
    cached = (0, 1, 2, 100)
    ext = extension(quota=16 * CLUSTER, policy=1, high=90, low=70, on_stale=1,
                    counters=(7, 4, 4 * CLUSTER, 7 * CLUSTER, 4, 0, 4 * CLUSTER, 0),
                    identity=raw_ident)
    vectors["filled-lru"] = (ext, BIT63, {k: base_cluster(k) for k in cached}, expected(
        "lru policy (90/70), on_stale refuse, four clusters cached, counters and a recorded "
        "identity of a qcow2 base in a local file.",
        ext=fields(ext, ident), autoclear=BIT63, used_clusters=4, usable=True))

    ident2 = {"kind": "http", "url": "https://images.example/base.qcow2", "size": base_file_size,
              "etag": "\"5f3a-1\"", "last_modified": None, "virtual_size": SIZE,
              "content_sha256": content_sha256(content)}
    raw_ident2 = identity_json(ident2)
    ext = extension(quota=256 * 1024, flags=0x80000001,
                    counters=(1, 2, 2 * CLUSTER, CLUSTER, 2, 0, CLUSTER, 1),
                    identity=raw_ident2, reserved=b"\x00\x00\x00\x01", tail=bytes(8))
    vectors["foreign-writer"] = (ext, 0, {k: base_cluster(k) for k in (1, 255)}, expected(
        "After a writer that does not know caches: bit 63 clear (revalidate before use). "
        "Unknown flag bits, nonzero reserved bytes, 8 bytes after the identity inside the "
        "length, and a recorded used_bytes (4096) that disagrees with the L2 tables (8192).",
        ext=fields(ext, ident2), autoclear=0, used_clusters=2, usable=True))

    ext = extension(quota=512 * 1024, identity=b"{}")
    vectors["legacy-empty-identity"] = (ext, BIT63, {}, expected(
        "Made before version 1.1: an empty identity written as \"{}\" (length 2); it means "
        "not recorded, as length 0 does.",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=0, usable=True))

    ext = extension(version=2, quota=512 * 1024, tail=bytes(16))
    vectors["unknown-version"] = (ext, BIT63, {k: base_cluster(k) for k in (0,)}, expected(
        "Extension version 2: not a cache to a reader of version 1; a valid qcow2 image "
        "with a backing file all the same.",
        ext={"length": len(ext), "version": 2}, autoclear=BIT63, used_clusters=1,
        usable=False))

    # Boot profiles (section 13).
    ext = extension(quota=512 * 1024, counters=(0, 2, 4 * CLUSTER, 0, 4, 0, 4 * CLUSTER, 0))
    ranges = [(100, 1), (0, 3)]
    prof = profile(ranges)
    profiles["profiled"] = prof
    vectors["profiled"] = (ext, BIT63, {k: base_cluster(k) for k in (0, 1, 2, 100)}, expected(
        "A cache that recorded its boot profile while filling: cluster 100 first, then "
        "clusters 0 - 2 (the second range starts before the first one's end: a negative "
        "delta). Still recording (flags 0).",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=4, usable=True,
        prof=profile_fields(prof, ranges, True)))

    ranges = [(255, 1), (7, 2), (200, 1)]
    prof = profile(ranges, flags=0x3 | 0x100, reserved=b"\x00\x07\x00", tail=bytes(5))
    profiles["profile-truncated"] = prof
    ext = extension(quota=512 * 1024)
    vectors["profile-truncated"] = (ext, BIT63, {}, expected(
        "A profile given at creation and cut to fit the header cluster: flags complete and "
        "truncated, plus an unknown flag bit (0x100); nonzero reserved bytes and 5 bytes "
        "after the last range, inside the length. All ignored; the profile is usable.",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=0, usable=True,
        prof=profile_fields(prof, ranges, True)))

    ranges = [(10, 2), (250, 10)]
    prof = profile(ranges, flags=1)
    profiles["profile-outside"] = prof
    vectors["profile-outside"] = (ext, BIT63, {}, expected(
        "A profile with a range past the disk's end (clusters 250 - 259 of 256): the reader "
        "ignores the profile (no prefetch) and keeps it as it is; the cache is usable.",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=0, usable=True,
        prof=profile_fields(prof, ranges, False)))

    prof = profile([(0, 4)], virtual_size=2 * SIZE)
    profiles["profile-other-size"] = prof
    vectors["profile-other-size"] = (ext, BIT63, {}, expected(
        "A profile recorded for a disk of another size (the image was resized since): "
        "ignored by the reader.",
        ext=fields(ext, {}), autoclear=BIT63, used_clusters=0, usable=True,
        prof=profile_fields(prof, [(0, 4)], False)))

    for name, (ext_bytes, autoclear, clusters, facts) in vectors.items():
        make_image(out / f"{name}.qcow2", backing="base.qcow2", ext=ext_bytes,
                   autoclear=autoclear, clusters=clusters, prof=profiles.get(name))
        (out / f"{name}.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.path.dirname(__file__)))
