"""What a cache holds, in recency order, and what its quota allows it to store.

One object keeps the clusters the store holds (least recently used first)
and the clusters promised to stores in progress, and decides each store:
under ``stop`` it stores while room remains; under ``lru`` a store that
would pass the high watermark first evicts the oldest clusters down to the
low watermark (docs/spec/cache-image.md, section 4). Decisions are made and
room reserved with no await, so concurrent stores never pass the quota
together.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable

from bootcache.qcow2 import cache_ext
from bootcache.qcow2.cache_ext import CacheExtension


class CacheQuota:
    """Held clusters (LRU order), reservations, and the quota policy."""

    def __init__(self, ext: CacheExtension, cluster_size: int) -> None:
        self.cs = cluster_size
        self.quota = ext.quota
        self.lru = ext.policy == cache_ext.POLICY_LRU
        self.high = ext.quota * ext.high_watermark // 100
        self.low = ext.quota * ext.low_watermark // 100
        #: Held clusters, least recently used first (read it, change it here).
        self.held: OrderedDict[int, None] = OrderedDict()
        #: Clusters promised to stores in progress.
        self.reserved = 0

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, ci: object) -> bool:
        return ci in self.held

    def used(self) -> int:
        """Clusters held or promised (what the quota counts)."""
        return len(self.held) + self.reserved

    def used_bytes(self) -> int:
        return len(self.held) * self.cs

    def add(self, clusters: Iterable[int]) -> None:
        """Clusters the store now holds, the most recently used."""
        held = self.held
        for ci in clusters:
            held[ci] = None

    def stored(self, clusters: range) -> None:
        """Reserved clusters a store wrote: held from now on."""
        self.add(clusters)
        self.reserved -= len(clusters)

    def unreserve(self, count: int) -> None:
        """Reserved clusters a store did not write after all."""
        self.reserved -= count

    def forget(self, clusters: Iterable[int]) -> None:
        held = self.held
        for ci in clusters:
            held.pop(ci, None)

    def clear(self) -> None:
        self.held.clear()

    def touch(self, offset: int, length: int) -> None:
        """A read used [offset, offset+length): its held clusters are the newest
        (only the lru policy keeps the order)."""
        if not self.lru:
            return
        held, cs = self.held, self.cs
        first, last = offset // cs, (offset + length - 1) // cs
        if first == last:
            if first in held:
                held.move_to_end(first)
            return
        for ci in range(first, last + 1):
            if ci in held:
                held.move_to_end(ci)

    def plan_store(self, count: int, busy: Container[int]) -> tuple[list[int], int]:
        """For a store of ``count`` clusters: the clusters to evict first
        (already forgotten here; never one in ``busy``) and how many of the
        ``count`` may be stored, reserved until :meth:`stored` or :meth:`unreserve`."""
        cs = self.cs
        victims: list[int] = []
        if self.lru and (self.used() + count) * cs > self.high:
            keep = max(self.low // cs - count, 0)
            victims = self._oldest(self.used() - keep, busy)
            self.forget(victims)
        granted = max(min(count, self.quota // cs - self.used()), 0)
        self.reserved += granted
        return victims, granted

    def room_without_evicting(self) -> int:
        """Clusters that may still be stored with no eviction: up to the quota
        (stop) or the high watermark (lru)."""
        limit = self.high if self.lru else self.quota
        return max(limit // self.cs - self.used(), 0)

    def _oldest(self, count: int, busy: Container[int]) -> list[int]:
        """Up to ``count`` least recently used clusters not in ``busy``: walks
        the order only as far as it must, not the whole cache."""
        out: list[int] = []
        if count <= 0:
            return out
        for ci in self.held:
            if ci not in busy:
                out.append(ci)
                if len(out) == count:
                    break
        return out
