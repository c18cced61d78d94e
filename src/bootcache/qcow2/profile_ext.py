"""Boot profiles: the order in which a cache first fetched its clusters.

A profile is a list of cluster ranges in fetch order. It lives in the cache
image as its own header extension (docs/spec/cache-image.md, section 13), in
the header cluster, so QEMU keeps it across header rewrites and no cluster
outside the header holds it. Profile files (``bootcache cache profile -o``)
are JSON with byte ranges; boot traces convert to profiles too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bootcache.errors import BootcacheError, ImageFormatError
from bootcache.qcow2 import cache_ext
from bootcache.qcow2 import format as fmt

VERSION = 1
#: Header extension type: the ASCII bytes "BCPF".
EXT_PROFILE = 0x42435046
#: The profile is complete: writers do not extend it.
FLAG_COMPLETE = 1 << 0
#: Ranges were left out because the profile did not fit in the header cluster.
FLAG_TRUNCATED = 1 << 1
KNOWN_FLAGS = FLAG_COMPLETE | FLAG_TRUNCATED
# version, flags, virtual_size, cluster_bits, reserved(3), range_count, clusters
_FIXED = struct.Struct(">IIQB3xIQ")
FIXED_SIZE = _FIXED.size  # 32
#: Bytes of the header cluster a profile leaves to other writers (QEMU's
#: feature table is larger than ours, for one).
SLACK = 2048
FILE_FORMAT = "bootcache-profile"


class ProfileError(BootcacheError):
    """A profile (file or extension) that cannot be used."""


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data):
            raise ImageFormatError("profile extension: a range runs past the extension's end")
        if shift > 63:
            raise ImageFormatError("profile extension: a number longer than 64 bits")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, pos


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _unzigzag(n: int) -> int:
    return n // 2 if n % 2 == 0 else -(n + 1) // 2


def _encode_range(start: int, count: int, prev_end: int, out: bytearray) -> None:
    _varint(_zigzag(start - prev_end), out)
    _varint(count - 1, out)


@dataclass
class Profile:
    """Cluster ranges ``[start, count]`` in the order they were first fetched."""

    virtual_size: int
    cluster_size: int
    ranges: list[list[int]] = field(default_factory=list)
    flags: int = 0
    #: Clusters the profile names (no cluster twice).
    named: set[int] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.named:
            for start, count in self.ranges:
                self.named.update(range(start, start + count))

    @property
    def clusters(self) -> int:
        return len(self.named)

    @property
    def complete(self) -> bool:
        return bool(self.flags & FLAG_COMPLETE)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TRUNCATED)

    @property
    def disk_clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)

    def record(self, start: int, count: int, limit: int) -> bool:
        """Append clusters not named yet, up to ``limit`` clusters in all;
        the profile is complete once it names ``limit``. Returns whether it
        changed."""
        if self.complete:
            return False
        changed = False
        for ci in range(start, start + count):
            if len(self.named) >= limit:
                break
            if ci in self.named:
                continue
            self.named.add(ci)
            last = self.ranges[-1] if self.ranges else None
            if last is not None and last[0] + last[1] == ci:
                last[1] += 1
            else:
                self.ranges.append([ci, 1])
            changed = True
        if len(self.named) >= limit:
            self.flags |= FLAG_COMPLETE
            changed = True
        return changed

    def limited(self, limit: int) -> Profile:
        """The first ``limit`` clusters of the profile (a quota's worth)."""
        out = Profile(self.virtual_size, self.cluster_size)
        for start, count in self.ranges:
            out.record(start, count, limit)
        out.flags |= self.flags
        return out

    # -- the header extension ------------------------------------------------------

    def encode(self, room: int | None = None) -> bytes:
        """The extension's data. With ``room``, the longest prefix of ranges
        that fits in ``room`` bytes (then marked truncated and complete, and
        this profile cut to match)."""
        body = bytearray()
        prev_end = 0
        for kept, (start, count) in enumerate(self.ranges):
            before = len(body)
            _encode_range(start, count, prev_end, body)
            if room is not None and FIXED_SIZE + len(body) > room:
                del body[before:]
                self._cut(kept)
                break
            prev_end = start + count
        clusters = sum(count for _, count in self.ranges)
        return _FIXED.pack(VERSION, self.flags, self.virtual_size,
                           self.cluster_size.bit_length() - 1, len(self.ranges),
                           clusters) + bytes(body)

    def _cut(self, keep: int) -> None:
        for start, count in self.ranges[keep:]:
            self.named.difference_update(range(start, start + count))
        del self.ranges[keep:]
        self.flags |= FLAG_TRUNCATED | FLAG_COMPLETE

    @classmethod
    def decode(cls, data: bytes) -> Profile:
        """Decode the extension's data; ImageFormatError if a reader following
        the spec must ignore the profile."""
        if len(data) < 4:
            raise ImageFormatError(f"profile extension: {len(data)} bytes, need {FIXED_SIZE}")
        version = struct.unpack_from(">I", data)[0]
        if version != VERSION:
            raise ImageFormatError(f"profile extension: unsupported version {version}")
        if len(data) < FIXED_SIZE:
            raise ImageFormatError(f"profile extension: {len(data)} bytes, need {FIXED_SIZE}")
        _, flags, vsize, cbits, nranges, clusters = _FIXED.unpack_from(data)
        if not 9 <= cbits <= 21:
            raise ImageFormatError(f"profile extension: cluster_bits {cbits} outside 9 - 21")
        prof = cls(vsize, 1 << cbits, flags=flags)
        disk = prof.disk_clusters
        pos, prev_end = FIXED_SIZE, 0
        for _ in range(nranges):
            delta, pos = _read_varint(data, pos)
            count, pos = _read_varint(data, pos)
            start, count = prev_end + _unzigzag(delta), count + 1
            if start < 0 or start + count > disk:
                raise ImageFormatError(
                    f"profile extension: range of clusters [{start}, {start + count}) "
                    f"outside the disk's {disk} clusters")
            span = range(start, start + count)
            if not prof.named.isdisjoint(span):
                raise ImageFormatError(f"profile extension: cluster range at {start} "
                                       "overlaps an earlier one")
            prof.named.update(span)
            prof.ranges.append([start, count])
            prev_end = start + count
        if len(prof.named) != clusters:
            raise ImageFormatError(f"profile extension: ranges name {len(prof.named)} "
                                   f"clusters, the extension says {clusters}")
        return prof

    # -- profile files -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        cs = self.cluster_size
        return {"format": FILE_FORMAT, "version": VERSION, "virtual_size": self.virtual_size,
                "cluster_size": cs, "clusters": self.clusters, "bytes": self.bytes,
                "complete": self.complete, "truncated": self.truncated,
                "ranges": [[s * cs, min(c * cs, self.virtual_size - s * cs)]
                           for s, c in self.ranges]}

    @property
    def bytes(self) -> int:
        """Guest bytes the profile names (the last cluster stops at the disk's end)."""
        cs, last = self.cluster_size, self.disk_clusters - 1
        tail = self.virtual_size - last * cs
        return self.clusters * cs - (cs - tail if last in self.named else 0)

    def regrain(self, cluster_size: int) -> Profile:
        """The same guest ranges in clusters of another size (rounded outward)."""
        if cluster_size == self.cluster_size:
            return self
        return from_byte_ranges(self.to_json()["ranges"], self.virtual_size, cluster_size)


def dumps(prof: Profile) -> str:
    """A profile file's text: JSON, one range a line."""
    import json  # not at the top: info and check read profiles without it

    doc = prof.to_json()
    ranges = doc.pop("ranges")
    head = json.dumps(doc, indent=1)[:-2]
    lines = ",\n  ".join(json.dumps(r) for r in ranges)
    return f'{head},\n "ranges": [\n  {lines}\n ]\n}}\n'


def from_byte_ranges(ranges: Iterable[tuple[int, int] | list[int]], virtual_size: int,
                     cluster_size: int, what: str = "profile") -> Profile:
    """A profile of byte ranges in order, each rounded out to whole clusters;
    clusters named twice keep their first place."""
    prof = Profile(virtual_size, cluster_size)
    for offset, length in ranges:
        if offset < 0 or length <= 0:
            raise ProfileError(f"{what}: range ({offset}, {length}) is empty or negative")
        if offset + length > virtual_size:
            raise ProfileError(f"{what}: range [{offset}, {offset + length}) lies outside "
                               f"the {virtual_size}-byte disk")
        first, last = offset // cluster_size, (offset + length - 1) // cluster_size
        prof.record(first, last - first + 1, limit=1 << 62)
    return prof


def from_json_text(text: str, path: str, virtual_size: int, cluster_size: int) -> Profile:
    """A profile file's text (JSON, as ``cache profile -o`` writes)."""
    import json

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ProfileError(f"{path}: not a profile: invalid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise ProfileError(f"{path}: not a profile (no \"format\": \"{FILE_FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ProfileError(f"{path}: profile version {doc.get('version')!r} is not supported")
    size, ranges = doc.get("virtual_size"), doc.get("ranges")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ProfileError(f"{path}: malformed profile: virtual_size must be a positive integer")
    if size != virtual_size:
        raise ProfileError(f"{path}: the profile is for a {size}-byte disk, the image is "
                           f"{virtual_size} bytes")
    if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in r) for r in ranges):
        raise ProfileError(f"{path}: malformed profile: ranges must be a list of "
                           "[offset, length] pairs of integers")
    return from_byte_ranges(ranges, virtual_size, cluster_size, what=path)


# -- where the extension fits --------------------------------------------------------

def room_for_profile(header: fmt.Header) -> int:
    """Bytes of profile data the header cluster can hold (spec section 13):
    what is left once every other extension is counted, the cache extension
    at its largest, and SLACK bytes left to other writers."""
    others = [e for e in header.extensions if e.type != EXT_PROFILE]
    saved = header.extensions, header.backing_file_offset, header.backing_file_size
    header.extensions = others
    try:
        used = len(_serialize_unchecked(header))
    finally:
        header.extensions, header.backing_file_offset, header.backing_file_size = saved
    cache = header.find_extension(fmt.EXT_CACHE)
    growth = cache_ext.FIXED_SIZE + cache_ext.MAX_IDENTITY - len(cache.data) if cache else 0
    return header.cluster_size - used - max(growth, 0) - SLACK - 8


def _serialize_unchecked(header: fmt.Header) -> bytes:
    # The header's own serializer refuses an overfull cluster; measure with room to spare.
    saved = header.cluster_bits
    header.cluster_bits = 21
    try:
        return fmt.serialize_header(header)
    finally:
        header.cluster_bits = saved


def read_profile(header: fmt.Header) -> Profile | None:
    """The image's profile, None if it has none; ImageFormatError if malformed."""
    ext = header.find_extension(EXT_PROFILE)
    return Profile.decode(ext.data) if ext is not None else None


def store_profile(header: fmt.Header, profile: Profile) -> None:
    """Put the profile in the header (to be written by the next header rewrite),
    cut to what fits; with no room at all (small clusters), it stops recording
    and is not stored."""
    room = room_for_profile(header)
    if room < FIXED_SIZE:
        profile._cut(0)
        header.set_extension(EXT_PROFILE, None)
        return
    header.set_extension(EXT_PROFILE, profile.encode(room))


def fields(data: bytes, image_size: int) -> dict[str, Any]:
    """The extension's fields under the spec's names (docs/spec/vectors), decoded
    as far as they go, and whether a reader may use the profile."""
    out: dict[str, Any] = {"length": len(data)}
    if len(data) >= 4:
        out["version"] = struct.unpack_from(">I", data)[0]
    if len(data) >= FIXED_SIZE and out["version"] == VERSION:
        _, flags, vsize, cbits, nranges, clusters = _FIXED.unpack_from(data)
        ranges: list[list[int]] | None = []
        pos, prev_end = FIXED_SIZE, 0
        try:
            for _ in range(nranges):
                delta, pos = _read_varint(data, pos)
                count, pos = _read_varint(data, pos)
                start = prev_end + _unzigzag(delta)
                ranges.append([start, count + 1])  # type: ignore[union-attr]
                prev_end = start + count + 1
        except ImageFormatError:
            ranges = None
        out.update(flags=flags, virtual_size=vsize, cluster_bits=cbits, range_count=nranges,
                   clusters=clusters, ranges=ranges)
    try:
        usable = Profile.decode(data).virtual_size == image_size
    except ImageFormatError:
        usable = False
    out["usable"] = usable
    return out
