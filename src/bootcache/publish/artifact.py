"""What a published cache is, and what a reader checks before trusting one.

An artifact is a qcow2 v3 image (docs/spec/cache-image.md, section 13): the
cache's data clusters compressed with zstd, the cache's own header
extensions copied verbatim (the cache extension with the base identity,
quota and policy; a boot profile if the cache has one), and the digest
extension. It keeps the cache's backing file, so QEMU reads it as the same
disk as the cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from bootcache.errors import ImageFormatError
from bootcache.qcow2 import cache_ext
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.digest_ext import EXT_DIGEST, Digest

#: Extensions never copied from a cache into an artifact or back: they are
#: rewritten (feature names, digest) or describe clusters of another file.
NOT_COPIED = frozenset({fmt.EXT_FEATURE_TABLE, EXT_DIGEST, fmt.EXT_BITMAPS, fmt.EXT_CRYPTO,
                        fmt.EXT_DATA_FILE})
#: A cluster's stored form in an artifact.
COMPRESSED, STANDARD = "compressed", "standard"


@dataclass
class DataCluster:
    """One data cluster of an artifact: guest cluster index and stored bytes."""

    guest: int
    kind: str
    #: Host byte range a reader takes (for compressed clusters: to the end of
    #: the last sector the L2 entry names).
    start: int
    end: int


@dataclass
class Artifact:
    """An artifact's header facts, decoded and checked."""

    header: fmt.Header
    digest: Digest
    cache: cache_ext.CacheExtension
    #: Where the digest's file_sha256 lies in the file.
    file_sha256_at: int

    @property
    def cs(self) -> int:
        return self.header.cluster_size

    @property
    def identity(self) -> dict[str, Any]:
        return self.cache.identity


def parse_head(first: bytes, file_size: int, name: str) -> Artifact:
    """Decode the header cluster of an artifact of ``file_size`` bytes."""
    h = fmt.parse_header(first, file_size, name=name)
    if h.version != 3:
        raise ImageFormatError(f"{name}: not a published cache (qcow2 version {h.version})")
    raw = h.find_extension(EXT_DIGEST)
    if raw is None:
        raise ImageFormatError(f"{name}: not a published cache (no digest extension)")
    digest = Digest.decode(raw.data)
    if digest.file_length != file_size:
        raise ImageFormatError(
            f"{name}: the file is {file_size} bytes but was published as "
            f"{digest.file_length}: truncated or not the published file")
    if h.backing_file is None:
        raise ImageFormatError(f"{name}: a published cache names its base; this one does not")
    ext = h.find_extension(fmt.EXT_CACHE)
    if ext is None:
        raise ImageFormatError(f"{name}: no cache extension (no base identity, quota, policy)")
    cache = cache_ext.CacheExtension.decode(ext.data)
    if not cache.identity:
        raise ImageFormatError(f"{name}: the base identity is missing")
    if h.extended_l2 or h.nb_snapshots:
        raise ImageFormatError(f"{name}: extended L2 entries or snapshots in a published cache")
    return Artifact(h, digest, cache, _digest_offset(first, h))


def _digest_offset(first: bytes, h: fmt.Header) -> int:
    from bootcache.qcow2.digest_ext import FILE_SHA256_AT
    from bootcache.qcow2.seqwrite import extension_data_offset

    return extension_data_offset(first[:h.cluster_size], EXT_DIGEST) + FILE_SHA256_AT


_ZERO_STRETCH = bytes(512)


def _nonzero_entries(table: bytes, count: int) -> list[tuple[int, int]]:
    """(index, entry) of the nonzero 64-bit entries of an L2 table, in order.
    Tables are mostly zeros: zero stretches are skipped without decoding."""
    out = []
    step = len(_ZERO_STRETCH)
    for at in range(0, count * 8, step):
        stretch = table[at:min(at + step, count * 8)]
        if stretch == _ZERO_STRETCH:
            continue
        first = at // 8
        out += [(first + j, e) for j, e in enumerate(struct.unpack(f">{len(stretch) // 8}Q",
                                                                   stretch)) if e]
    return out


def data_clusters(art: Artifact, l1: bytes, l2_tables: dict[int, bytes],
                  data_start: int) -> list[DataCluster]:
    """The artifact's data clusters in guest order, each checked to lie in the data
    area (from ``data_start`` to the end of the file) after the one before it,
    so a reader can take them in one forward pass."""
    h = art.header
    cs = art.cs
    cb = h.cluster_bits
    per = fmt.l2_entries_per_table(h)
    x = 62 - (cb - 8)
    out: list[DataCluster] = []
    prev_start = -1
    for l1i in range(h.l1_size):
        if not struct.unpack_from(">Q", l1, l1i * 8)[0] & fmt.L1E_OFFSET_MASK:
            continue
        for i, e in _nonzero_entries(l2_tables[l1i], per):
            guest = l1i * per + i
            if e & fmt.OFLAG_COMPRESSED:
                start = e & ((1 << x) - 1)
                sectors = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
                end = (start & ~511) + sectors * 512
                kind = COMPRESSED
            elif e & fmt.OFLAG_ZERO or e & fmt.L2E_RESERVED_MASK or not e & fmt.L2E_OFFSET_MASK:
                raise ImageFormatError(
                    f"{art.header.backing_file}: artifact L2 entry {e:#x} of guest cluster "
                    f"{guest} is not a data cluster")
            else:
                start = e & fmt.L2E_OFFSET_MASK
                end = start + cs
                kind = STANDARD
            if start < data_start or start <= prev_start or end > art.digest.file_length \
                    or guest * cs >= h.size:
                raise ImageFormatError(
                    f"artifact: data of guest cluster {guest} at {start:#x} is out of order or "
                    "outside the data area")
            out.append(DataCluster(guest, kind, start, end))
            prev_start = start
    if len(out) != art.digest.data_clusters:
        raise ImageFormatError(f"artifact: {len(out)} data clusters, the digest says "
                               f"{art.digest.data_clusters}")
    return out
