"""The counters of a cache layer, in one small object.

The cache layer counts here as it serves; the node daemon's registry (and
so ``ctl stats`` and Prometheus) reads them through the layer's
``metrics()``, a snapshot, never through the layer's private state. Counters
the spec keeps in the image (docs/spec/cache-image.md, section 3) start from
the cache extension and are written back into it when the cache saves its
records; the others count since the cache was opened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bootcache.qcow2.cache_ext import COUNTERS, POLICY_NAMES, CacheExtension

#: Counters the image keeps (all of the extension's but used_bytes, a gauge).
PERSISTED = tuple(name for name in COUNTERS if name != "used_bytes")


@dataclass
class CacheStats:
    """What a cache counts; each field only grows."""

    # Kept in the image (spec section 3).
    hits: int = 0
    misses: int = 0
    bytes_from_base: int = 0
    bytes_from_cache: int = 0
    clusters_stored: int = 0
    evictions: int = 0
    resets: int = 0
    # Since the cache was opened.
    #: Background work (stores, flushes, version checks) that failed.
    background_errors: int = 0
    #: Times the disk had no room for a store or flush (reads went on from the base).
    no_space: int = 0
    #: Bytes a prefetch fetched, and reads that then hit those clusters.
    prefetched_bytes: int = 0
    prefetch_hits: int = 0

    @classmethod
    def from_extension(cls, ext: CacheExtension) -> CacheStats:
        return cls(**{name: getattr(ext, name) for name in PERSISTED})

    def save_into(self, ext: CacheExtension) -> None:
        """Copy the persisted counters into the extension about to be written."""
        for name in PERSISTED:
            setattr(ext, name, getattr(self, name))

    def reads(self) -> int:
        """Reads served so far, hits and misses."""
        return self.hits + self.misses

    def snapshot(self, ext: CacheExtension, **gauges: Any) -> dict[str, Any]:
        """Counters, the quota settings and ``gauges`` (the layer's state right
        now, used_bytes among them), under the names ``cache stats`` and the
        metrics use."""
        out: dict[str, Any] = asdict(self)
        out.update(quota=ext.quota, policy=POLICY_NAMES[ext.policy], **gauges)
        return out
