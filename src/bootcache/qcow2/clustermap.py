"""The cluster map: guest offset -> host cluster, through the L1 and L2 tables.

It owns the L1 table, the L2 table cache and the index of L2 table clusters,
looks guest ranges up, and allocates (L2 tables, data clusters) through the
refcounts. Ordering is structural, not a convention of the call sites:

- the L2 cache depends on the refcounts' barrier: a dirty table reaches the
  disk only once every write completed before its last change is durable
  (the refcounts it relies on, and the data its new entries point to);
- an L1 entry is written only at flush, after the dirty L2 tables and a sync
  that makes them durable (QEMU's order too);
- a cluster an entry stops pointing to goes to the free queue, which refuses
  to release anything while L2 or L1 changes are still unwritten.
"""

from __future__ import annotations

from array import array

from bootcache.errors import ImageCorruptError, UnsupportedFeatureError
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)
from bootcache.qcow2.freequeue import FreeQueue
from bootcache.qcow2.refcount import Refcounts
from bootcache.qcow2.tables import TableCache, decode_u64, encode_u64

# Kinds of mapped extents.
UNALLOC, DATA, ZERO, COMPRESSED = 0, 1, 2, 3
Mapping = tuple[int, int, int, int]  # (kind, guest offset, length, host offset or L2 entry)

# L2 entry bits that make a cluster anything but plain data.
_NOT_PLAIN_DATA = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK


class ClusterMap:
    """L1 table, L2 tables (cached), lookups and allocation."""

    def __init__(self, refcounts: Refcounts, l1: array[int], *, name: str,
                 l2_cache_bytes: int = 32 << 20) -> None:
        self.refcounts = refcounts
        self.headers = refcounts.headers
        self.barrier = refcounts.barrier
        self.name = name
        h = self.headers.header
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.extended = h.extended_l2
        self.l2_entries = fmt.l2_entries_per_table(h)
        self.l1 = l1
        #: Indices of L1 entries changed in memory only.
        self.l1_dirty: set[int] = set()
        self.l2_cache: TableCache[array[int]] = TableCache(
            l2_cache_bytes // self.cs, self._load_l2, self._write_l2,
            depends_on=refcounts.barrier)
        #: Clusters holding active L2 tables (for overlap checks).
        self.l2_offsets = {int(e) & L1E_OFFSET_MASK for e in l1 if e & L1E_OFFSET_MASK}
        self.frees = FreeQueue(refcounts, self.metadata_dirty)

    def metadata_dirty(self) -> bool:
        return bool(self.l2_cache.dirty or self.l1_dirty)

    def is_metadata(self, host: int) -> bool:
        """True when the cluster at ``host`` holds metadata (header, tables, ...)."""
        h = self.headers.header
        if host < self.cs:
            return True
        if h.l1_table_offset <= host < h.l1_table_offset + h.l1_size * 8:
            return True
        rt = self.refcounts
        if rt.table_offset <= host < rt.table_offset + len(rt.table) * 8:
            return True
        return host in self.l2_offsets or host in rt.block_set

    # -- L2 tables ------------------------------------------------------------

    async def _load_l2(self, offset: int) -> array[int]:
        if offset + self.cs > max(self.barrier.file_size, await self.barrier.source.size()):
            raise ImageCorruptError(f"{self.name}: L2 table at {offset:#x} lies beyond the end")
        h = self.headers.header
        if offset < self.cs or (h.l1_table_offset <= offset < h.l1_table_offset + h.l1_size * 8) \
                or offset in self.refcounts.block_set:
            raise ImageCorruptError(f"{self.name}: L2 table at {offset:#x} overlaps metadata")
        return decode_u64(await self.barrier.source.pread(offset, self.cs))

    async def _write_l2(self, offset: int, table: array[int]) -> None:
        # Called by the cache only, after the barrier passed what the table relies on.
        await self.barrier.pwrite(offset, encode_u64(table))

    def table_offset(self, l1i: int) -> int:
        return int(self.l1[l1i]) & L1E_OFFSET_MASK

    async def table(self, l1i: int) -> array[int] | None:
        """The L2 table of ``l1i`` for reading (None: not allocated)."""
        if l1i >= len(self.l1):
            return None
        e = self.l1[l1i]
        if e & L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L1 entry {l1i} has reserved bits set")
        off = e & L1E_OFFSET_MASK
        return await self.l2_cache.get(off) if off else None

    async def table_for_write(self, l1i: int) -> array[int]:
        """The L2 table for ``l1i``, allocated (or copied if shared) as needed."""
        e = self.l1[l1i]
        if e & L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L1 entry {l1i} has reserved bits set")
        off = e & L1E_OFFSET_MASK
        if off and e & OFLAG_COPIED:
            return await self.l2_cache.get(off)
        cluster, _ = await self.refcounts.allocate(1)
        new_off = cluster << self.cb
        table = array("Q", await self.l2_cache.get(off)) if off else array("Q", bytes(self.cs))
        # Write the new table at once, so that no refcount ever covers a
        # cluster past the end of the file.
        try:
            await self.barrier.pwrite(new_off, encode_u64(table))
        except BaseException:
            # Nothing references it yet: give it back, or a full disk would
            # leak a cluster for every write that failed.
            await self.refcounts.update(cluster, 1, -1)
            await self.barrier.punch_hole(new_off, self.cs)
            raise
        if off:  # the shared table is copied: it can go once nothing points to it
            self.l2_cache.drop(off)
            self.l2_offsets.discard(off)
            self.frees.push(off >> self.cb, 1, punch=False)
        self.l2_offsets.add(new_off)
        await self.l2_cache.put(new_off, table, dirty=True)
        self._set_l1(l1i, new_off | OFLAG_COPIED)
        return table

    def touch(self, l1i: int, table: array[int]) -> None:
        """Record a change to the L2 table of ``l1i``."""
        self.l2_cache.mark_dirty(self.table_offset(l1i), table)

    def _set_l1(self, l1i: int, entry: int) -> None:
        self.l1[l1i] = entry
        self.l1_dirty.add(l1i)

    # -- lookups --------------------------------------------------------------

    def data_host(self, offset: int, length: int) -> int:
        """Host offset of a range of normal data clusters, contiguous on the
        host and in one cached L2 table, else -1: the lookup of a hot read,
        with no await and no allocation (the general path is :meth:`map_range`)."""
        cb = self.cb
        ci = offset >> cb
        more = ((offset + length - 1) >> cb) - ci  # clusters after the first
        if self.extended or length <= 0:
            return -1
        l1i, l2i = divmod(ci, self.l2_entries)
        if l1i >= len(self.l1) or l2i + more >= self.l2_entries:
            return -1
        table = self.l2_cache.lookup(self.l1[l1i] & L1E_OFFSET_MASK)
        if table is None:
            return -1
        e = table[l2i]
        if e & _NOT_PLAIN_DATA or not e & L2E_OFFSET_MASK:
            return -1
        host = e & L2E_OFFSET_MASK
        for k in range(1, more + 1):
            e = table[l2i + k]
            if e & _NOT_PLAIN_DATA or (e & L2E_OFFSET_MASK) != host + (k << cb):
                return -1
        return host + (offset & (self.cs - 1))

    async def map_range(self, offset: int, length: int) -> list[Mapping]:
        """Describe [offset, offset+length) as merged runs of one kind each.

        DATA runs carry the host offset of their first byte (host-contiguous
        clusters merge); COMPRESSED runs lie within one cluster and carry the
        L2 entry instead.
        """
        out: list[Mapping] = []
        pos, end = offset, offset + length
        while pos < end:
            table = await self.table((pos >> self.cb) // self.l2_entries)
            pos = self._map_table(out, table, pos, end)
        return out

    def map_range_nowait(self, offset: int, length: int) -> list[Mapping] | None:
        """:meth:`map_range` with no await: None when an L2 table it needs is
        not in the cache (nothing is loaded)."""
        out: list[Mapping] = []
        pos, end = offset, offset + length
        while pos < end:
            l1i = (pos >> self.cb) // self.l2_entries
            table = None
            if l1i < len(self.l1):
                e = self.l1[l1i]
                if e & L1E_RESERVED_MASK:
                    return None  # map_range reports the damage
                off = e & L1E_OFFSET_MASK
                if off:
                    table = self.l2_cache.lookup(off)
                    if table is None:
                        return None
            pos = self._map_table(out, table, pos, end)
        return out

    def _map_table(self, out: list[Mapping], table: array[int] | None, pos: int,
                   end: int) -> int:
        """Map [pos, end) as far as the L2 table of ``pos`` reaches (``table``
        None: not allocated); returns where it stopped."""
        cb, cs, per = self.cb, self.cs, self.l2_entries
        ci = pos >> cb
        l1i, l2i = divmod(ci, per)
        if table is None:
            stop = min(end, (l1i + 1) * per * cs)
            append_run(out, UNALLOC, pos, stop - pos, 0)
            return stop
        while pos < end and l2i < per:
            cluster_end = min(end, ((pos >> cb) + 1) << cb)
            if self.extended:
                self._map_extended(out, table, l2i, pos, cluster_end)
            else:
                kind, host = self.classify(table[l2i], ci)
                if host and kind != COMPRESSED:
                    host += pos & (cs - 1)
                append_run(out, kind, pos, cluster_end - pos, host)
            pos = cluster_end
            l2i += 1
            ci += 1
        return pos

    def classify(self, e: int, ci: int) -> tuple[int, int]:
        """(kind, host offset or entry) of a standard L2 entry for cluster ``ci``."""
        if e & OFLAG_COMPRESSED:
            return COMPRESSED, e
        if e & L2E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} has reserved bits set")
        if e & OFLAG_ZERO:
            if self.headers.header.version < 3:
                raise ImageCorruptError(f"{self.name}: zero cluster in a version 2 image")
            return ZERO, e & L2E_OFFSET_MASK  # a preallocated zero cluster keeps its host
        host = e & L2E_OFFSET_MASK
        if host:
            return DATA, host
        if e & OFLAG_COPIED:
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} maps to offset 0")
        return UNALLOC, 0

    def _map_extended(self, out: list[Mapping], table: array[int], l2i: int,
                      pos: int, stop: int) -> None:
        e, bitmap = table[2 * l2i], table[2 * l2i + 1]
        ci = pos >> self.cb
        if e & OFLAG_COMPRESSED:
            append_run(out, COMPRESSED, pos, stop - pos, e)
            return
        if e & (L2E_RESERVED_MASK | OFLAG_ZERO):
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} has reserved bits set")
        host = e & L2E_OFFSET_MASK
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise ImageCorruptError(
                f"{self.name}: subcluster both allocated and zero in cluster {ci}")
        if alloc and not host:
            raise ImageCorruptError(f"{self.name}: allocated subclusters without a host cluster")
        sc_bits = self.cb - 5
        base = ci << self.cb
        while pos < stop:
            sc = (pos - base) >> sc_bits
            sc_end = min(stop, base + ((sc + 1) << sc_bits))
            if alloc >> sc & 1:
                append_run(out, DATA, pos, sc_end - pos, host + (pos - base))
            elif zero >> sc & 1:
                append_run(out, ZERO, pos, sc_end - pos, 0)
            else:
                append_run(out, UNALLOC, pos, sc_end - pos, 0)
            pos = sc_end

    def compressed_clusters(self, entry: int) -> tuple[int, int]:
        """(first host cluster, count) touched by a compressed cluster's data."""
        x = 62 - (self.cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        last = host + sectors * 512 - (host & 511) - 1
        return host >> self.cb, (last >> self.cb) - (host >> self.cb) + 1

    async def allocated_clusters(self, *, zero: bool = False) -> list[int]:
        """Guest clusters with data in this image (with ``zero``: zero clusters)."""
        out: list[int] = []
        per = self.l2_entries
        for l1i in range(len(self.l1)):
            table = await self.table(l1i)
            if table is None:
                continue
            base = l1i * per
            step = 2 if self.extended else 1
            if zero:
                out.extend(base + i for i in range(len(table)) if table[i] & OFLAG_ZERO
                           and not table[i] & OFLAG_COMPRESSED and not self.extended)
                continue
            # In a compressed entry bit 0 belongs to the host offset, not the
            # zero flag: a compressed cluster always holds data.
            out.extend(base + i // step for i in range(0, len(table), step)
                       if table[i] & OFLAG_COMPRESSED
                       or (table[i] & L2E_OFFSET_MASK and not table[i] & OFLAG_ZERO))
        return out

    # -- changing entries -----------------------------------------------------

    async def allocate_data(self, want: int) -> tuple[int, int]:
        """Allocate up to ``want`` contiguous data clusters: (first, count)."""
        start, got = await self.refcounts.allocate(want)
        host = start << self.cb
        if any(self.is_metadata(host + (k << self.cb)) for k in range(got)):
            raise ImageCorruptError(
                f"{self.name}: allocator returned a metadata cluster at {host:#x}")
        return start, got

    def drop_reference(self, e: int) -> None:
        """Queue the release of whatever an L2 entry being replaced pointed to."""
        if e & OFLAG_COMPRESSED:
            first, count = self.compressed_clusters(e)
            self.frees.push(first, count, punch=False)
        elif e & L2E_OFFSET_MASK:
            self.frees.push((e & L2E_OFFSET_MASK) >> self.cb, 1, punch=True)

    async def unmap(self, clusters: list[int]) -> None:
        """Make guest clusters unallocated (reads go to the backing layer)."""
        for ci in sorted(clusters):
            l1i, l2i = divmod(ci, self.l2_entries)
            table = await self.table(l1i)
            if table is None or not table[l2i]:
                continue
            table = await self.table_for_write(l1i)
            self.drop_reference(table[l2i])
            table[l2i] = 0
            self.touch(l1i, table)

    async def zero_clusters(self, first: int, last: int, *, may_unmap: bool, discard: bool,
                            has_backing: bool) -> None:
        """Zero (or discard) the whole clusters of [first, last) in the L2 tables."""
        v3 = self.headers.header.version >= 3
        per, cb, cs = self.l2_entries, self.cb, self.cs
        pos = first
        while pos < last:
            l1i, l2i = divmod(pos >> cb, per)
            stop = min(last, (l1i + 1) * per * cs)
            if not self.table_offset(l1i) and (not v3 or not has_backing):
                pos = stop  # nothing allocated, nothing below (or v2): reads zeros already
                continue
            table = await self.table_for_write(l1i)
            while pos < stop:
                e = table[l2i]
                keep = (not may_unmap and not discard and v3 and e & OFLAG_COPIED
                        and not e & OFLAG_COMPRESSED and e & L2E_OFFSET_MASK)
                if keep:
                    new = e | OFLAG_ZERO
                else:
                    new = OFLAG_ZERO if v3 and (has_backing or not discard) else 0
                    if new == OFLAG_ZERO and not has_backing and not e:
                        new = 0  # unallocated without backing already reads zeros
                if new != e:
                    if not keep:
                        self.drop_reference(e)
                    table[l2i] = new
                    self.touch(l1i, table)
                pos += cs
                l2i += 1

    async def set_copied(self, l1i: int, l2i: int | None, copied: bool) -> None:
        """Set or clear OFLAG_COPIED on an L1 entry (``l2i`` None) or an L2 entry
        (repair: the image is quiescent, the change goes through the caches)."""
        def flip(e: int) -> int:
            return (e | OFLAG_COPIED) if copied else (e & ~OFLAG_COPIED)
        if l2i is None:
            self._set_l1(l1i, flip(int(self.l1[l1i])))
            return
        table = await self.table(l1i)
        assert table is not None
        table[l2i] = flip(table[l2i])
        self.touch(l1i, table)

    # -- durability -----------------------------------------------------------

    async def flush(self) -> None:
        """Write the dirty L2 tables, then the dirty L1 entries, then release
        the free queue; each step waits for what it relies on."""
        await self.l2_cache.flush()
        while self.l1_dirty:
            # The tables the entries point to are durable as they are now.
            await self.barrier.sync()
            dirty, self.l1_dirty = sorted(self.l1_dirty), set()
            l1_offset = self.headers.header.l1_table_offset
            try:
                for lo, hi in _ranges(dirty):
                    await self.barrier.pwrite(l1_offset + 8 * lo,
                                              encode_u64(self.l1[lo:hi + 1]))
            except BaseException:
                self.l1_dirty.update(dirty)  # written again at the next flush
                raise
        await self.frees.release()
        await self.barrier.sync()

    async def grow(self, new_size: int) -> None:
        """Enlarge the virtual disk, moving the L1 table if it must grow.

        The new L1 table is durable before the header points to it (the
        header writer syncs first); the old one is freed only after that.
        """
        await self.flush()
        need = -(-new_size // (self.cs * self.l2_entries))
        if need * 8 > fmt.MAX_L1_BYTES:
            raise UnsupportedFeatureError(f"{self.name}: {new_size} bytes needs an L1 "
                                          "table over 32 MiB; use larger clusters")
        h = self.headers.header
        old_off, old_clusters = h.l1_table_offset, -(-h.l1_size * 8 // self.cs)
        if need <= h.l1_size:
            await self.headers.set_disk(new_size, h.l1_size, h.l1_table_offset)
            return
        n_clusters = -(-need * 8 // self.cs)
        start, got = await self.refcounts.allocate(n_clusters)
        while got < n_clusters:  # need a contiguous run: give back and retry further on
            await self.refcounts.update(start, got, -1)
            self.refcounts.free_hint = start + got
            start, got = await self.refcounts.allocate(n_clusters)
        new_l1 = array("Q", self.l1)
        new_l1.extend([0] * (n_clusters * self.cs // 8 - len(new_l1)))
        await self.barrier.pwrite(start << self.cb, encode_u64(new_l1))
        self.l1 = new_l1[:need]
        await self.headers.set_disk(new_size, need, start << self.cb)
        if old_clusters:
            await self.refcounts.update(old_off >> self.cb, old_clusters, -1)
            await self.barrier.sync()


def append_run(out: list[Mapping], kind: int, guest: int, length: int, host: int) -> None:
    """Append a run to ``out``, merging it with the last one where it continues it."""
    if out:
        pk, pg, pl, ph = out[-1]
        if pk == kind and pg + pl == guest and kind != COMPRESSED and \
                (ph + pl == host if kind in (DATA, ZERO) and (ph or host) else True):
            out[-1] = (pk, pg, pl + length, ph)
            return
    out.append((kind, guest, length, host))


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out

