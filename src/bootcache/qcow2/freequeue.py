"""Clusters waiting to be freed.

A cluster an L2 or L1 entry stopped referencing is not free yet: the old
entry may still be on disk, and a read in progress may still be reading it.
The free queue holds such clusters and gives them back to the refcounts only
when both are over: no dirty metadata is left (so nothing on disk points to
them once the barrier is passed) and every read that started before the drop
has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bootcache.qcow2.refcount import Refcounts


@dataclass(frozen=True)
class _Free:
    cluster: int
    count: int
    punch: bool  # give the space back to the file system too
    epoch: int


class FreeQueue:
    """Dropped clusters, released once nothing on disk or in flight uses them."""

    def __init__(self, refcounts: Refcounts, metadata_dirty: Callable[[], bool]) -> None:
        self.refcounts = refcounts
        self._metadata_dirty = metadata_dirty
        self._pending: list[_Free] = []
        # Reads in progress by the epoch they started in.
        self._epoch = 0
        self._active_reads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, cluster: int, count: int, *, punch: bool) -> None:
        self._pending.append(_Free(cluster, count, punch, self._epoch))
        self._epoch += 1  # reads starting from now on cannot map the dropped cluster

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Mark a read in progress: clusters it may have mapped stay unreleased."""
        epoch = self._epoch
        active = self._active_reads
        active[epoch] = active.get(epoch, 0) + 1
        try:
            yield
        finally:
            left = active[epoch] - 1
            if left:
                active[epoch] = left
            else:
                del active[epoch]

    async def release(self) -> None:
        """Give back what is safe to give back; the rest waits for a later call."""
        if not self._pending:
            return
        if self._metadata_dirty():
            raise AssertionError("free queue released while metadata is dirty")
        barrier = self.refcounts.barrier
        await barrier.sync()  # the metadata that dropped the references is durable
        oldest_read = min(self._active_reads, default=self._epoch)
        ready = [f for f in self._pending if f.epoch < oldest_read]
        if not ready:
            return
        self._pending = [f for f in self._pending if f.epoch >= oldest_read]
        rc = self.refcounts
        for f in ready:
            await rc.update(f.cluster, f.count, -1)
            if f.punch and await rc.get(f.cluster) == 0:
                await barrier.punch_hole(f.cluster << rc.cluster_bits, f.count << rc.cluster_bits)
        await barrier.sync()
