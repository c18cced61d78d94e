"""Refcounts and cluster allocation.

Refcount changes are written through to the file at once (only the bytes of
the changed entries), through the sync barrier the refcounts own
(:attr:`Refcounts.barrier`). Anything that comes to rely on an allocation
(an L2 table, the L1 table, the header) depends on that barrier and reaches
the disk only after the increment is durable. Decrements go the other way
round: the free queue applies them only once nothing on disk points to the
clusters. A crash at any moment therefore leaves at worst leaked clusters,
never a cluster that is referenced but free.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from bootcache.errors import ImageCorruptError, ImageFormatError
from bootcache.qcow2.barrier import SyncBarrier
from bootcache.qcow2.format import MAX_REFTABLE_BYTES, REFT_RESERVED_MASK
from bootcache.qcow2.header import HeaderWriter
from bootcache.qcow2.tables import RefBlock, SparseTable, TableCache, encode_u64


class Refcounts:
    """The refcount table, a cache of refcount blocks, and the allocator."""

    def __init__(self, headers: HeaderWriter, table: SparseTable, *,
                 cache_bytes: int = 4 << 20, name: str = "image") -> None:
        self.headers = headers
        #: The sync point of refcount changes, and the door of every engine write.
        self.barrier: SyncBarrier = headers.barrier
        self.source = headers.barrier.source
        self.name = name
        self.cluster_bits = headers.header.cluster_bits
        self.cs = 1 << self.cluster_bits
        self.bits = headers.header.refcount_bits
        self.per_block = self.cs * 8 // self.bits
        self.table = table
        #: Offsets of the refcount blocks (an index of ``table``, for overlap checks).
        self.block_set = set(table.nonzero())
        self.cache: TableCache[RefBlock] = TableCache(
            cache_bytes // self.cs, self._load_block, self._never_dirty)
        #: Every cluster below this index was seen in use; allocation scans from here.
        self.free_hint = 0
        #: Optional veto used while repairing: clusters the scan proved in use.
        self.in_use: Callable[[int], bool] | None = None

    @classmethod
    async def load(cls, headers: HeaderWriter, *, name: str = "image") -> Refcounts:
        h = headers.header
        raw = await headers.barrier.source.pread(
            h.refcount_table_offset, h.refcount_table_clusters << h.cluster_bits)
        return cls(headers, SparseTable.decode(raw), name=name)

    @property
    def table_offset(self) -> int:
        """Where the refcount table lies (the header owns that fact)."""
        return self.headers.header.refcount_table_offset

    # -- blocks ---------------------------------------------------------------

    def _block_offset(self, b: int) -> int:
        if b >= len(self.table):
            return 0
        off: int = self.table[b]
        if off & REFT_RESERVED_MASK:
            raise ImageCorruptError(
                f"{self.name}: refcount table entry {b} ({off:#x}) has reserved bits set")
        return off

    async def _load_block(self, offset: int) -> RefBlock:
        if offset < self.cs or \
                offset + self.cs > max(self.barrier.file_size, await self.source.size()):
            raise ImageCorruptError(
                f"{self.name}: refcount block at {offset:#x} lies outside the image")
        return RefBlock(await self.source.pread(offset, self.cs), self.bits)

    async def _never_dirty(self, offset: int, block: RefBlock) -> None:
        raise AssertionError("refcount blocks are written through, never dirty")

    async def block(self, b: int) -> RefBlock | None:
        off = self._block_offset(b)
        return await self.cache.get(off) if off else None

    def block_offsets(self) -> list[int]:
        return self.table.nonzero()

    # -- queries --------------------------------------------------------------

    async def get(self, cluster: int) -> int:
        blk = await self.block(cluster // self.per_block)
        return blk.get(cluster % self.per_block) if blk else 0

    # -- updates --------------------------------------------------------------

    async def update(self, cluster: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``."""
        c, end = cluster, cluster + count
        while c < end:
            b = c // self.per_block
            blk = await self.block(b)
            if blk is None:
                if delta < 0:
                    raise ImageCorruptError(
                        f"{self.name}: freeing cluster {c} whose refcount block is missing")
                blk = await self._create_block(b)
            base = b * self.per_block
            i0, i1 = c - base, min(end - base, self.per_block)
            old = [blk.get(i) for i in range(i0, i1)]
            for i in range(i0, i1):
                v = blk.get(i) + delta
                if v < 0:
                    raise ImageCorruptError(
                        f"{self.name}: refcount of cluster {base + i} would drop below zero")
                if v > blk.mask:
                    raise ImageCorruptError(
                        f"{self.name}: refcount of cluster {base + i} overflows "
                        f"{self.bits} bits")
                blk.set(i, v)
            lo, data = blk.byte_span(i0, i1 - 1)
            try:
                await self.barrier.pwrite(self._block_offset(b) + lo, data)
            except BaseException:
                # Keep memory equal to the disk (e.g. on ENOSPC).
                for i, v in zip(range(i0, i1), old, strict=True):
                    blk.set(i, v)
                raise
            if delta < 0:
                self.free_hint = min(self.free_hint, c)
            c = base + i1

    async def set_exact(self, cluster: int, value: int) -> None:
        """Set one refcount to ``value`` (repair only)."""
        cur = await self.get(cluster)
        if cur != value:
            await self.update(cluster, 1, value - cur)

    async def allocate(self, want: int) -> tuple[int, int]:
        """Allocate up to ``want`` contiguous clusters; returns (first, count).

        The first free run found is used, so freed clusters are reused before
        the file grows; ``count`` is less than ``want`` when the run is short.
        """
        c = self.free_hint
        while True:
            b = c // self.per_block
            blk = await self.block(b)
            if blk is None:
                blk = await self._create_block(b)
            base = b * self.per_block
            i = blk.first_zero(c - base)
            while i < self.per_block and self.in_use is not None and self.in_use(base + i):
                i = blk.first_zero(i + 1)
            if i >= self.per_block:
                c = base + self.per_block
                continue
            j = i + 1
            while j < self.per_block and j - i < want and blk.get(j) == 0 and \
                    (self.in_use is None or not self.in_use(base + j)):
                j += 1
            start = base + i
            if (start + 1) << self.cluster_bits > 1 << 56:
                raise ImageFormatError(f"{self.name}: image would grow beyond 64 PiB")
            await self.update(start, j - i, +1)
            self.free_hint = start + (j - i)
            return start, j - i

    async def _create_block(self, b: int) -> RefBlock:
        """Create the missing refcount block ``b`` inside the range it covers."""
        if b >= len(self.table):
            await self._grow_table(b)
            blk = await self.block(b)
            if blk is not None:
                return blk
        first = b * self.per_block
        slot = first
        while self.in_use is not None and self.in_use(slot):
            slot += 1
        if slot == 0 or slot >= first + self.per_block:
            raise ImageCorruptError(f"{self.name}: no room for refcount block {b}")
        blk = RefBlock(bytes(self.cs), self.bits)
        blk.set(slot - first, 1)
        off = slot << self.cluster_bits
        # The block must be on disk before the table entry that points to it.
        await self.barrier.pwrite(off, blk.tobytes())
        await self.barrier.sync()
        self.table[b] = off
        self.block_set.add(off)
        await self.barrier.pwrite(self.table_offset + 8 * b, off.to_bytes(8, "big"))
        await self.cache.put(off, blk, dirty=False)
        return blk

    async def _grow_table(self, need_block: int) -> None:
        """Move the refcount table to a larger one covering block ``need_block``.

        The new table and the refcount blocks describing it go into the free
        area right after everything the old table covers; they describe
        themselves. The header switches over only once they are durable.
        """
        old_n = len(self.table)
        start = old_n * self.per_block
        new_n = max(need_block + 1, old_n * 2)
        while True:
            t_clusters = -(-new_n * 8 // self.cs)
            nblocks = 1
            while -(-(nblocks + t_clusters) // self.per_block) > nblocks:
                nblocks += 1
            if start // self.per_block + nblocks <= new_n:
                break
            new_n = start // self.per_block + nblocks
        if t_clusters * self.cs > MAX_REFTABLE_BYTES:
            raise ImageFormatError(f"{self.name}: image too large for its refcount table")
        used = nblocks + t_clusters
        new_table = array("Q", self.table)
        new_table.extend([0] * (t_clusters * self.cs // 8 - old_n))
        for k in range(nblocks):
            blk = RefBlock(bytes(self.cs), self.bits)
            covered = min(used - k * self.per_block, self.per_block)
            for i in range(covered):
                blk.set(i, 1)
            off = (start + k) << self.cluster_bits
            await self.barrier.pwrite(off, blk.tobytes())
            new_table[start // self.per_block + k] = off
            self.block_set.add(off)
            await self.cache.put(off, blk, dirty=False)
        table_off = (start + nblocks) << self.cluster_bits
        await self.barrier.pwrite(table_off, encode_u64(new_table))
        old_off, old_clusters = self.table_offset, -(-old_n * 8 // self.cs)
        # The header writer syncs the new table and blocks before pointing to
        # them; its in-memory fields switch at once, together with ours.
        self.table = SparseTable(new_table)
        await self.headers.set_refcount_table(table_off, t_clusters)
        await self.update(old_off >> self.cluster_bits, old_clusters, -1)
