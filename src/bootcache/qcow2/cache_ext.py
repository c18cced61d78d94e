"""The cache-image header extension (docs/spec/cache-image.md), encoded and decoded.

The extension is a fixed 96-byte part followed by the base identity, a
UTF-8 JSON object. All integers are big endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from bootcache.errors import ImageFormatError

VERSION = 1
POLICY_STOP, POLICY_LRU = 0, 1
POLICY_NAMES = {POLICY_STOP: "stop", POLICY_LRU: "lru"}
ON_STALE_RESET, ON_STALE_REFUSE = 0, 1
ON_STALE_NAMES = {ON_STALE_RESET: "reset", ON_STALE_REFUSE: "refuse"}
MAX_IDENTITY = 1024


class UnknownCacheVersion(ImageFormatError):
    """The extension has a version this code does not know: the image is a
    plain qcow2 to us (spec section 2), not a broken one."""

    def __init__(self, version: int) -> None:
        super().__init__(f"cache extension: unsupported version {version}")
        self.version = version

# version, flags, quota, policy, high, low, on_stale, reserved(4),
# hits, misses, bytes_from_base, bytes_from_cache, clusters_stored, evictions,
# used_bytes, resets, identity_length, reserved(4)
_FIXED = struct.Struct(">IIQBBBB4xQQQQQQQQI4x")
FIXED_SIZE = _FIXED.size  # 96

COUNTERS = ("hits", "misses", "bytes_from_base", "bytes_from_cache", "clusters_stored",
            "evictions", "used_bytes", "resets")


@dataclass
class CacheExtension:
    """What a cache image records about itself."""

    quota: int
    policy: int = POLICY_STOP
    high_watermark: int = 95
    low_watermark: int = 80
    on_stale: int = ON_STALE_RESET
    hits: int = 0
    misses: int = 0
    bytes_from_base: int = 0
    bytes_from_cache: int = 0
    clusters_stored: int = 0
    evictions: int = 0
    used_bytes: int = 0
    resets: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    #: Flag bits (none defined yet): kept as found, as the spec requires.
    flags: int = 0
    #: A reserved field held a nonzero value when decoded (ignored, written back as 0).
    reserved_nonzero: bool = field(default=False, compare=False)

    def problems(self) -> list[str]:
        """Why this extension must not be used as a cache (empty: it may)."""
        out = []
        if self.quota == 0:
            out.append("cache extension: quota is 0 (it must be positive)")
        if self.policy not in POLICY_NAMES:
            out.append(f"cache extension: unknown quota policy {self.policy}")
        if self.on_stale not in ON_STALE_NAMES:
            out.append(f"cache extension: unknown stale-base policy {self.on_stale}")
        # The watermarks mean something only to lru; under stop they are ignored.
        if self.policy == POLICY_LRU and not 0 < self.low_watermark <= self.high_watermark <= 100:
            out.append(f"cache extension: watermarks {self.low_watermark}/{self.high_watermark} "
                       "must satisfy 0 < low <= high <= 100")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ImageFormatError(problems[0])

    def encode(self) -> bytes:
        import json  # only cache images need it: plain `info` and `create` skip its import

        self.validate()
        # An empty identity is written with length 0 (spec 1.1), never as "{}".
        ident = b"" if not self.identity else json.dumps(
            self.identity, sort_keys=True, separators=(",", ":")).encode()
        if len(ident) > MAX_IDENTITY:
            raise ImageFormatError("cache extension: base identity too long")
        return _FIXED.pack(VERSION, self.flags, self.quota, self.policy, self.high_watermark,
                           self.low_watermark, self.on_stale, self.hits, self.misses,
                           self.bytes_from_base, self.bytes_from_cache, self.clusters_stored,
                           self.evictions, self.used_bytes, self.resets, len(ident)) + ident

    @classmethod
    def decode(cls, data: bytes, *, strict: bool = True) -> CacheExtension:
        """Decode the extension's data; with ``strict``, also refuse values the
        spec forbids a cache to be used with (see :meth:`problems`)."""
        if len(data) < 4:
            raise ImageFormatError(f"cache extension: {len(data)} bytes, need {FIXED_SIZE}")
        # The version decides how the rest reads, whatever the length.
        version = struct.unpack_from(">I", data)[0]
        if version != VERSION:
            raise UnknownCacheVersion(version)
        if len(data) < FIXED_SIZE:
            raise ImageFormatError(f"cache extension: {len(data)} bytes, need {FIXED_SIZE}")
        (version, flags, quota, policy, high, low, on_stale, hits, misses, from_base,
         from_cache, stored, evictions, used, resets, ident_len) = _FIXED.unpack_from(data)
        if ident_len > MAX_IDENTITY or FIXED_SIZE + ident_len > len(data):
            raise ImageFormatError("cache extension: base identity overruns the extension")
        raw = data[FIXED_SIZE:FIXED_SIZE + ident_len]
        import json
        # Images made before 1.1 wrote an empty identity as "{}": it decodes to {}
        # just as length 0 does, so both mean "not recorded yet".
        try:
            identity = json.loads(raw) if raw else {}
        except ValueError as e:
            raise ImageFormatError("cache extension: base identity is not JSON") from e
        if not isinstance(identity, dict):
            raise ImageFormatError("cache extension: base identity is not a JSON object")
        ext = cls(quota=quota, policy=policy, high_watermark=high, low_watermark=low,
                  on_stale=on_stale, hits=hits, misses=misses, bytes_from_base=from_base,
                  bytes_from_cache=from_cache, clusters_stored=stored, evictions=evictions,
                  used_bytes=used, resets=resets, identity=identity, flags=flags,
                  reserved_nonzero=any(data[20:24]) or any(data[92:96]))
        if strict:
            ext.validate()
        return ext

    def counters(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTERS}


def fields(data: bytes) -> dict[str, Any]:
    """The extension's fields under the spec's names (docs/spec/vectors use
    them). Of a version this code does not know, only the version."""
    try:
        ext = CacheExtension.decode(data, strict=False)
    except UnknownCacheVersion as e:
        return {"length": len(data), "version": e.version}
    out: dict[str, Any] = {
        "length": len(data), "version": VERSION, "flags": ext.flags, "quota": ext.quota,
        "policy": ext.policy, "high_watermark": ext.high_watermark,
        "low_watermark": ext.low_watermark, "on_stale": ext.on_stale, **ext.counters(),
        "identity_length": _FIXED.unpack_from(data)[-1], "identity": ext.identity}
    return out
