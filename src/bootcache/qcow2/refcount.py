"""Refcounts and cluster allocation.

Refcount changes are written through to the file at once (only the bytes of
the changed entries), so an allocation is on disk before any L2 entry that
uses it can be: the image layer flushes the file before writing back L2
tables. Decrements go the other way round: the image layer applies them only
after the L2 tables that dropped the references are durable. A crash at any
moment therefore leaves at worst leaked clusters, never a cluster that is
referenced but free.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from bootcache.errors import ImageCorruptError, ImageFormatError
from bootcache.qcow2.format import MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE, REFT_RESERVED_MASK
from bootcache.qcow2.tables import RefBlock, SparseTable, TableCache, encode_u64
from bootcache.sources.base import ByteSource


class Refcounts:
    """The refcount table, a cache of refcount blocks, and the allocator."""

    def __init__(self, source: ByteSource, *, cluster_bits: int, refcount_bits: int,
                 table_offset: int, table: SparseTable, file_size: int,
                 cache_bytes: int = 4 << 20, name: str = "image") -> None:
        self.source = source
        self.name = name
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = refcount_bits
        self.per_block = self.cs * 8 // refcount_bits
        self.table_offset = table_offset
        self.table = table
        self.block_set = set(table.nonzero())
        self.file_size = file_size
        self.cache: TableCache[RefBlock] = TableCache(
            cache_bytes // self.cs, self._load_block, self._never_dirty)
        #: Every cluster below this index was seen in use; allocation scans from here.
        self.free_hint = 0
        #: Optional veto used while repairing: clusters the scan proved in use.
        self.in_use: Callable[[int], bool] | None = None

    @classmethod
    async def load(cls, source: ByteSource, *, cluster_bits: int, refcount_bits: int,
                   table_offset: int, table_clusters: int, file_size: int,
                   name: str = "image") -> Refcounts:
        raw = await source.pread(table_offset, table_clusters << cluster_bits)
        return cls(source, cluster_bits=cluster_bits, refcount_bits=refcount_bits,
                   table_offset=table_offset, table=SparseTable.decode(raw),
                   file_size=file_size,
                   name=name)

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
        if offset < self.cs or offset + self.cs > max(self.file_size, await self.source.size()):
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
                await self.source.pwrite(self._block_offset(b) + lo, data)
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
        await self.source.pwrite(off, blk.tobytes())
        await self.source.flush()
        self.table[b] = off
        self.block_set.add(off)
        await self.source.pwrite(self.table_offset + 8 * b, off.to_bytes(8, "big"))
        self.file_size = max(self.file_size, off + self.cs)
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
            await self.source.pwrite(off, blk.tobytes())
            new_table[start // self.per_block + k] = off
            self.block_set.add(off)
            await self.cache.put(off, blk, dirty=False)
        table_off = (start + nblocks) << self.cluster_bits
        await self.source.pwrite(table_off, encode_u64(new_table))
        await self.source.flush()
        hdr = table_off.to_bytes(8, "big") + t_clusters.to_bytes(4, "big")
        await self.source.pwrite(OFF_REFCOUNT_TABLE, hdr)
        await self.source.flush()
        old_off, old_clusters = self.table_offset, -(-old_n * 8 // self.cs)
        self.table, self.table_offset = SparseTable(new_table), table_off
        self.file_size = max(self.file_size, (start + used) << self.cluster_bits)
        await self.update(old_off >> self.cluster_bits, old_clusters, -1)
