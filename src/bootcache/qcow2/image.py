"""The qcow2 image as a block layer: opening, mapping, reads, writes, flush.

Write ordering (what makes a crash at any point leave a consistent image):

1. refcount increments are written through when clusters are allocated;
2. guest data goes to its new cluster;
3. dirty L2 tables are written back, each only after a file flush that
   makes (1) and (2) durable;
4. dirty L1 entries, after another flush that makes (3) durable;
5. refcount decrements of clusters that L2 entries stopped referencing,
   only after (3) and (4) are durable.

So the worst a crash leaves is leaked clusters (refcount 1, unreferenced),
which ``qemu-img check`` accepts and ``bootcache check -r leaks`` repairs.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Iterator
from contextlib import contextmanager

from bootcache.block.graph import NodeRef
from bootcache.block.layer import BlockLayer, Extent, SourceBacked
from bootcache.errors import (
    ImageCorruptError,
    ReadOnlyError,
    StaleBaseError,
    UnsupportedFeatureError,
)
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.compress import decompress_cluster
from bootcache.qcow2.format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
)
from bootcache.qcow2.refcount import Refcounts
from bootcache.qcow2.tables import TableCache, decode_u64, encode_u64
from bootcache.sources.base import ByteSource

# Kinds of mapped extents.
UNALLOC, DATA, ZERO, COMPRESSED = 0, 1, 2, 3
Mapping = tuple[int, int, int, int]  # (kind, guest offset, length, host offset or L2 entry)

_MAX_WRITE_CHUNK = 32 << 20
# L2 entry bits that make a cluster anything but plain data.
_NOT_PLAIN_DATA = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK


class Qcow2Image(SourceBacked, BlockLayer):
    """A qcow2 file on a byte source, optionally over a backing layer."""

    def __init__(self, source: ByteSource, header: Header, l1: array[int],
                 refcounts: Refcounts, *, writable: bool, name: str,
                 l2_cache_bytes: int = 32 << 20) -> None:
        self.source = source
        self.header = header
        self.name = name
        self.l1 = l1
        self.refcounts = refcounts
        self.writable = writable
        #: The open backing file (None: not opened, or none), held by reference.
        self.backing_ref: NodeRef | None = None
        self.cb = header.cluster_bits
        self.cs = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entries = fmt.l2_entries_per_table(header)
        self.l2_cache: TableCache[array[int]] = TableCache(
            l2_cache_bytes // self.cs, self._load_l2, self._writeback_l2)
        self.l1_dirty: set[int] = set()
        self.l2_offsets = {int(e) & L1E_OFFSET_MASK for e in l1 if e & L1E_OFFSET_MASK}
        #: (first cluster, count, punch hole, epoch of the drop) awaiting release.
        self.pending_frees: list[tuple[int, int, bool, int]] = []
        # Reads in progress by the epoch they started in: a dropped cluster is
        # released only once no read that may still map it is running.
        self.epoch = 0
        self.active_reads: dict[int, int] = {}
        self.unsynced_allocations = False
        self.lock = asyncio.Lock()
        self.file_size = 0
        self._last_compressed: tuple[int, bytes] | None = None
        self.closed = False
        #: Format decisions follow the header, whether or not the backing is open.
        self.has_backing = header.backing_file is not None

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def open(cls, source: ByteSource, *, writable: bool = False,
                   keep_autoclear: int = 0, name: str | None = None) -> Qcow2Image:
        """Open and validate a qcow2 image; with ``writable``, prepare it for writes.

        Unknown autoclear bits (all but ``keep_autoclear``) are cleared before
        the first write, as the format requires of writers that do not know
        them.
        """
        name = name or source.name
        file_size = await source.size()
        first = await source.pread(0, min(max(file_size, 512), 1 << fmt.MAX_CLUSTER_BITS))
        header = fmt.parse_header(first, file_size, name=name)
        if writable:
            if header.incompatible_features & fmt.INCOMPAT_CORRUPT:
                raise ImageCorruptError(
                    f"{name}: image is marked corrupt; repair it before writing")
            if header.extended_l2:
                raise UnsupportedFeatureError(
                    f"{name}: writing images with extended L2 entries is not supported; "
                    "open it read-only")
        l1 = decode_u64(await source.pread(header.l1_table_offset, header.l1_size * 8)) \
            if header.l1_size else array("Q")
        refcounts = await Refcounts.load(
            source, cluster_bits=header.cluster_bits, refcount_bits=header.refcount_bits,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters, file_size=file_size, name=name)
        if not refcounts.table[0]:
            raise ImageCorruptError(f"{name}: the header cluster has no refcount block")
        img = cls(source, header, l1, refcounts, writable=writable, name=name)
        img.file_size = file_size
        if writable:
            await img._prepare_for_writing(keep_autoclear)
        return img

    async def _prepare_for_writing(self, keep_autoclear: int) -> None:
        h = self.header
        if h.version == 3:
            cleared = h.autoclear_features & ~keep_autoclear
            if cleared:
                h.autoclear_features &= keep_autoclear
                await self.source.pwrite(fmt.OFF_AUTOCLEAR,
                                         h.autoclear_features.to_bytes(8, "big"))
                await self.source.flush()
        if h.incompatible_features & fmt.INCOMPAT_DIRTY:
            # Refcounts may be stale (lazy refcounts): rebuild before any allocation.
            from bootcache.qcow2.check import check_image

            result = await check_image(self, repair="all")
            if result.corruptions:
                raise ImageCorruptError(
                    f"{self.name}: dirty image could not be repaired "
                    f"({result.corruptions} corruptions remain)")
            await self.source.flush()
            h.incompatible_features &= ~fmt.INCOMPAT_DIRTY
            await self.source.pwrite(fmt.OFF_INCOMPATIBLE,
                                     h.incompatible_features.to_bytes(8, "big"))
            await self.source.flush()

    # -- BlockLayer basics ----------------------------------------------------------

    @property
    def size(self) -> int:
        # QEMU counts whole 512-byte sectors: an unaligned header size rounds down.
        return self.header.size & ~511

    @property
    def read_only(self) -> bool:
        return not self.writable

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{self.name}: image is open read-only")

    @property
    def backing(self) -> BlockLayer | None:
        """The layer below, read where this image holds nothing."""
        ref = self.backing_ref
        return ref.layer if ref is not None else None

    def drop_clean_metadata(self) -> None:
        """Forget cached L2 tables and refcount blocks that match the disk."""
        self.l2_cache.drop_clean()
        self.refcounts.cache.drop_clean()

    def lower(self) -> list[BlockLayer]:
        backing = self.backing
        return [backing] if backing is not None else []

    def attach_backing(self, ref: NodeRef | None) -> NodeRef | None:
        """Read from ``ref``'s layer from now on; returns the reference held
        before, which the caller releases."""
        old, self.backing_ref = self.backing_ref, ref
        return old

    async def settle(self) -> None:
        if self.backing is not None:
            await self.backing.settle()

    async def refresh_identity(self) -> None:
        if self.source.writable or not self.source.identity():
            return
        # A qcow2 file that changed under us has metadata we may have cached.
        raise StaleBaseError(f"{self.name}: the qcow2 image changed; reopen it")

    # -- metadata overlap checks ------------------------------------------------

    def is_metadata(self, host: int) -> bool:
        """True when the cluster at ``host`` holds metadata (header, tables, ...)."""
        h, cs = self.header, self.cs
        if host < cs:
            return True
        if h.l1_table_offset <= host < h.l1_table_offset + h.l1_size * 8:
            return True
        rt = self.refcounts
        if rt.table_offset <= host < rt.table_offset + len(rt.table) * 8:
            return True
        return host in self.l2_offsets or host in rt.block_set

    # -- L2 tables ------------------------------------------------------------

    async def _load_l2(self, offset: int) -> array[int]:
        if offset + self.cs > max(self.file_size, await self.source.size()):
            raise ImageCorruptError(f"{self.name}: L2 table at {offset:#x} lies beyond the end")
        h = self.header
        if offset < self.cs or (h.l1_table_offset <= offset < h.l1_table_offset + h.l1_size * 8) \
                or offset in self.refcounts.block_set:
            raise ImageCorruptError(f"{self.name}: L2 table at {offset:#x} overlaps metadata")
        return decode_u64(await self.source.pread(offset, self.cs))

    async def _writeback_l2(self, offset: int, table: array[int]) -> None:
        if self.unsynced_allocations:
            await self.source.flush()
            self.unsynced_allocations = False
        await self.source.pwrite(offset, encode_u64(table))

    async def _l2_table(self, l1i: int) -> array[int] | None:
        if l1i >= len(self.l1):
            return None
        e = self.l1[l1i]
        if e & L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L1 entry {l1i} has reserved bits set")
        off = e & L1E_OFFSET_MASK
        return await self.l2_cache.get(off) if off else None

    async def _l2_table_for_write(self, l1i: int) -> tuple[int, array[int]]:
        """The L2 table for ``l1i``, allocated (or copied if shared) as needed."""
        e = self.l1[l1i]
        if e & L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L1 entry {l1i} has reserved bits set")
        off = e & L1E_OFFSET_MASK
        if off and e & OFLAG_COPIED:
            return off, await self.l2_cache.get(off)
        cluster, _ = await self.refcounts.allocate(1)
        self.unsynced_allocations = True
        new_off = cluster << self.cb
        table = array("Q", await self.l2_cache.get(off)) if off else array("Q", bytes(self.cs))
        # Write the new table at once, so that no refcount ever covers a
        # cluster past the end of the file.
        try:
            await self.source.pwrite(new_off, encode_u64(table))
        except BaseException:
            # Nothing references it yet: give it back (a full disk would keep
            # a leaked cluster for each write that failed).
            await self.refcounts.update(cluster, 1, -1)
            await self.source.punch_hole(new_off, self.cs)
            raise
        if off:
            self._schedule_free(off >> self.cb, 1, False)  # the shared table, now copied
        self.file_size = max(self.file_size, new_off + self.cs)
        self.l2_offsets.add(new_off)
        await self.l2_cache.put(new_off, table, dirty=True)
        self.l1[l1i] = new_off | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return new_off, table

    # -- mapping --------------------------------------------------------------

    def data_host(self, offset: int, length: int) -> int:
        """Host offset of a range inside one normal data cluster whose L2 table
        is cached, else -1: the lookup of a hot read, with no await and no
        allocation (the general path is :meth:`map_range`)."""
        cb = self.cb
        ci = offset >> cb
        if (offset + length - 1) >> cb != ci or self.extended:
            return -1
        l1i, l2i = divmod(ci, self.l2_entries)
        if l1i >= len(self.l1):
            return -1
        table = self.l2_cache.peek(self.l1[l1i] & L1E_OFFSET_MASK)
        if table is None:
            return -1
        e = table[l2i]
        if e & _NOT_PLAIN_DATA or not e & L2E_OFFSET_MASK:
            return -1
        return (e & L2E_OFFSET_MASK) + (offset & (self.cs - 1))

    async def map_range(self, offset: int, length: int) -> list[Mapping]:
        """Describe [offset, offset+length) as merged runs of one kind each.

        DATA runs carry the host offset of their first byte (host-contiguous
        clusters merge); COMPRESSED runs lie within one cluster and carry the
        L2 entry instead.
        """
        out: list[Mapping] = []
        pos, end = offset, offset + length
        cb, cs, per = self.cb, self.cs, self.l2_entries
        while pos < end:
            ci = pos >> cb
            l1i, l2i = divmod(ci, per)
            table = await self._l2_table(l1i)
            if table is None:
                stop = min(end, (l1i + 1) * per * cs)
                _append(out, UNALLOC, pos, stop - pos, 0)
                pos = stop
                continue
            while pos < end and l2i < per:
                cluster_end = min(end, ((pos >> cb) + 1) << cb)
                if self.extended:
                    self._map_extended(out, table, l2i, pos, cluster_end)
                else:
                    e = table[l2i]
                    kind, host = self._classify(e, ci)
                    if host and kind != COMPRESSED:
                        host += pos & (cs - 1)
                    _append(out, kind, pos, cluster_end - pos, host)
                pos = cluster_end
                l2i += 1
                ci += 1
        return out

    def _classify(self, e: int, ci: int) -> tuple[int, int]:
        if e & OFLAG_COMPRESSED:
            return COMPRESSED, e
        if e & L2E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} has reserved bits set")
        if e & OFLAG_ZERO:
            if self.header.version < 3:
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
            _append(out, COMPRESSED, pos, stop - pos, e)
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
                _append(out, DATA, pos, sc_end - pos, host + (pos - base))
            elif zero >> sc & 1:
                _append(out, ZERO, pos, sc_end - pos, 0)
            else:
                _append(out, UNALLOC, pos, sc_end - pos, 0)
            pos = sc_end

    # -- reads ----------------------------------------------------------------

    async def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        with self.reading():
            runs = await self.map_range(offset, length)
            if len(runs) == 1:
                return await self._read_run(runs[0])
            return b"".join([await self._read_run(r) for r in runs])

    async def _read_run(self, run: Mapping) -> bytes:
        kind, guest, length, host = run
        if kind == DATA:
            return await self.source.pread(host, length)
        if kind == ZERO:
            return bytes(length)
        if kind == UNALLOC:
            return await self.read_below(guest, length)
        data = await self._read_compressed(host)
        start = guest & (self.cs - 1)
        return data[start:start + length]

    async def read_below(self, offset: int, length: int) -> bytes:
        """Bytes the backing layer provides (zeros where there is none)."""
        below = self.backing
        if below is None or offset >= below.size:
            return bytes(length)
        if offset + length <= below.size:
            return await below.pread(offset, length)
        part = await below.pread(offset, below.size - offset)
        return part + bytes(length - len(part))

    async def _read_compressed(self, entry: int) -> bytes:
        if self._last_compressed and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        x = 62 - (self.cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        nbytes = sectors * 512 - (host & 511)
        if host + nbytes > max(self.file_size, await self.source.size()) + 512:
            raise ImageCorruptError(
                f"{self.name}: compressed cluster at {host:#x} lies beyond the end")
        data = decompress_cluster(await self.source.pread(host, nbytes), self.cs,
                                  self.header.compression_type)
        self._last_compressed = (entry, data)
        return data

    def compressed_clusters(self, entry: int) -> tuple[int, int]:
        """(first host cluster, count) touched by a compressed cluster's data."""
        x = 62 - (self.cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        last = host + sectors * 512 - (host & 511) - 1
        return host >> self.cb, (last >> self.cb) - (host >> self.cb) + 1

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for kind, guest, n, _ in await self.map_range(offset, length):
            if kind == UNALLOC:
                if self.backing is None or guest >= self.backing.size:
                    out.append(Extent(guest, n, data=False, zero=True, depth=0))
                    continue
                stop = min(guest + n, self.backing.size)
                pos = guest
                while pos < stop:
                    for ext in await self.backing.block_status(pos, stop - pos):
                        depth = ext.depth + 1 if ext.depth else 0
                        out.append(Extent(ext.offset, ext.length, ext.data, ext.zero, depth))
                        pos = ext.offset + ext.length
                if stop < guest + n:
                    out.append(Extent(stop, guest + n - stop, data=False, zero=True, depth=0))
            else:
                out.append(Extent(guest, n, data=kind != ZERO, zero=kind == ZERO, depth=1))
        return out

    # -- writes ---------------------------------------------------------------

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     *, fua: bool = False) -> None:
        self._require_writable()
        self.check_range(offset, len(data))
        view = memoryview(data).cast("B")
        async with self.lock:
            try:
                for pos in range(0, len(view), _MAX_WRITE_CHUNK):
                    await self._write(offset + pos, view[pos:pos + _MAX_WRITE_CHUNK])
            except ImageCorruptError:
                await self._mark_corrupt()
                raise
        if fua:
            await self.flush()

    async def _write(self, offset: int, view: memoryview) -> None:
        """Write within the lock: in place where a cluster is ours, else allocate."""
        cb, cs, per = self.cb, self.cs, self.l2_entries
        pos, end = offset, offset + len(view)
        while pos < end:
            l1i, l2i = divmod(pos >> cb, per)
            _, table = await self._l2_table_for_write(l1i)
            table_end = min(end, (l1i + 1) * per * cs)
            # Group the clusters of this table into runs handled with one I/O each.
            while pos < table_end:
                e = table[l2i]
                run_end = min(table_end, ((pos >> cb) + 1) << cb)
                if self._writable_in_place(e, pos >> cb):
                    if e & OFLAG_ZERO:
                        # A preallocated zero cluster: fill it, then drop the flag.
                        await self._fill_zero_cluster(e, pos, view[pos - offset:run_end - offset])
                        table[l2i] = e & ~OFLAG_ZERO
                        self.l2_cache.mark_dirty(table_offset(self, l1i), table)
                        pos, l2i = run_end, l2i + 1
                        continue
                    host = (e & L2E_OFFSET_MASK) + (pos & (cs - 1))
                    # Extend over following clusters that are ours and host-contiguous.
                    j = l2i + 1
                    while run_end < table_end and self._writable_in_place(table[j], j) and \
                            not table[j] & OFLAG_ZERO and table[j] & L2E_OFFSET_MASK == (
                                e & L2E_OFFSET_MASK) + ((j - l2i) << cb):
                        run_end = min(table_end, run_end + cs)
                        j += 1
                    await self.source.pwrite(host, view[pos - offset:run_end - offset])
                    pos, l2i = run_end, j
                    continue
                # Allocate fresh clusters for a run of clusters that need them.
                j = l2i + 1
                while run_end < table_end and not self._writable_in_place(table[j], j):
                    run_end = min(table_end, run_end + cs)
                    j += 1
                first_ci = pos >> cb
                want = ((run_end - 1) >> cb) - first_ci + 1
                start, got = await self.refcounts.allocate(want)
                self.unsynced_allocations = True
                stop = min(run_end, (first_ci + got) << cb)
                buf = await self._full_clusters(table, l2i, pos, stop,
                                                view[pos - offset:stop - offset])
                host = start << cb
                if any(self.is_metadata(host + (k << cb)) for k in range(got)):
                    raise ImageCorruptError(
                        f"{self.name}: allocator returned a metadata cluster at {host:#x}")
                try:
                    await self.source.pwrite(host, buf)
                except BaseException:
                    # Nothing references the new clusters yet: give them back
                    # (on a full disk, leaking them would keep it full).
                    await self.refcounts.update(start, got, -1)
                    await self.source.punch_hole(host, got << cb)
                    raise
                self.file_size = max(self.file_size, host + len(buf))
                for k in range(got):
                    self._drop_reference(table[l2i + k])
                    table[l2i + k] = (host + (k << cb)) | OFLAG_COPIED
                self.l2_cache.mark_dirty(table_offset(self, l1i), table)
                pos, l2i = stop, l2i + got

    def _writable_in_place(self, e: int, ci: int) -> bool:
        if not e & OFLAG_COPIED or e & OFLAG_COMPRESSED:
            return False
        if e & L2E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} has reserved bits set")
        host = e & L2E_OFFSET_MASK
        if not host or self.is_metadata(host):
            raise ImageCorruptError(
                f"{self.name}: data cluster {ci} maps to metadata at {host:#x}; refusing to write")
        return True

    async def _fill_zero_cluster(self, e: int, pos: int, piece: memoryview) -> None:
        """Write into a preallocated zero cluster: zeros around the new bytes."""
        cs = self.cs
        start = pos & ~(cs - 1)
        buf = bytearray(cs)
        buf[pos - start:pos - start + len(piece)] = piece
        await self.source.pwrite(e & L2E_OFFSET_MASK, buf)

    async def _full_clusters(self, table: array[int], l2i: int, pos: int, stop: int,
                             piece: memoryview) -> bytes | bytearray | memoryview:
        """Whole-cluster content for [pos, stop): ``piece`` over the old content."""
        cb, cs = self.cb, self.cs
        start = pos & ~(cs - 1)
        end = ((stop - 1) | (cs - 1)) + 1
        if start == pos and end == stop:
            return piece
        buf = bytearray(end - start)
        buf[pos - start:stop - start] = piece
        if pos != start:
            old = await self._old_cluster(table[l2i], start)
            buf[:pos - start] = old[:pos - start]
        if stop != end and stop < self.size:
            # (Past the end of the disk the tail is padding: zeros, nothing to read.)
            last = (end - start) >> cb
            old = await self._old_cluster(table[l2i + last - 1], end - cs)
            buf[stop - start:] = old[stop - (end - cs):]
        return buf

    async def _old_cluster(self, e: int, guest: int) -> bytes:
        """The current content of one cluster, wherever it comes from."""
        kind, host = self._classify(e, guest >> self.cb)
        if kind == DATA:
            return await self.source.pread(host, self.cs)
        if kind == ZERO:
            return bytes(self.cs)
        if kind == COMPRESSED:
            return await self._read_compressed(e)
        length = min(self.cs, self.size - guest)
        return await self.read_below(guest, length) + bytes(self.cs - length)

    def _drop_reference(self, e: int) -> None:
        """Schedule the release of whatever an L2 entry being replaced pointed to."""
        if e & OFLAG_COMPRESSED:
            first, count = self.compressed_clusters(e)
            self._schedule_free(first, count, False)
        elif e & L2E_OFFSET_MASK:
            self._schedule_free((e & L2E_OFFSET_MASK) >> self.cb, 1, True)

    def _schedule_free(self, cluster: int, count: int, punch: bool) -> None:
        self.pending_frees.append((cluster, count, punch, self.epoch))
        self.epoch += 1  # reads starting from now on cannot map the dropped cluster

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Mark a read in progress: clusters it may have mapped stay unreleased."""
        epoch = self.epoch
        active = self.active_reads
        active[epoch] = active.get(epoch, 0) + 1
        try:
            yield
        finally:
            left = active[epoch] - 1
            if left:
                active[epoch] = left
            else:
                del active[epoch]

    async def _mark_corrupt(self) -> None:
        """Set the corrupt bit and stop writing, as QEMU does on finding
        metadata it must not trust: the image needs a check before reuse."""
        h = self.header
        if self.writable and h.version >= 3:
            h.incompatible_features |= fmt.INCOMPAT_CORRUPT
            try:
                await self.source.pwrite(fmt.OFF_INCOMPATIBLE,
                                         h.incompatible_features.to_bytes(8, "big"))
                await self.source.flush()
            except OSError:
                pass
        self.writable = False

    async def unmap_clusters(self, clusters: list[int]) -> None:
        """Make guest clusters unallocated again (reads go to the backing layer).

        Used by cache eviction; the host clusters are freed (and their space
        punched out of the file) at the next flush.
        """
        self._require_writable()
        async with self.lock:
            await self._unmap_locked(clusters)

    async def unmap_all(self) -> int:
        """Make every data and zero cluster unallocated; returns how many."""
        self._require_writable()
        async with self.lock:
            clusters = await self.allocated_clusters() + await self.allocated_clusters(zero=True)
            await self._unmap_locked(clusters)
            return len(clusters)

    async def _unmap_locked(self, clusters: list[int]) -> None:
        for ci in sorted(clusters):
            l1i, l2i = divmod(ci, self.l2_entries)
            table = await self._l2_table(l1i)
            if table is None or not table[l2i]:
                continue
            _, table = await self._l2_table_for_write(l1i)
            self._drop_reference(table[l2i])
            table[l2i] = 0
            self.l2_cache.mark_dirty(table_offset(self, l1i), table)

    async def allocated_clusters(self, *, zero: bool = False) -> list[int]:
        """Guest clusters with data in this image (with ``zero``: zero clusters)."""
        out: list[int] = []
        per = self.l2_entries
        for l1i in range(len(self.l1)):
            table = await self._l2_table(l1i)
            if table is None:
                continue
            base = l1i * per
            step = 2 if self.extended else 1
            if zero:
                out.extend(base + i for i in range(len(table)) if table[i] & OFLAG_ZERO
                           and not table[i] & OFLAG_COMPRESSED and not self.extended)
                continue
            out.extend(base + i // step for i in range(0, len(table), step)
                       if table[i] & (L2E_OFFSET_MASK | OFLAG_COMPRESSED)
                       and not table[i] & OFLAG_ZERO)
        return out

    async def grow(self, new_size: int) -> None:
        """Enlarge the virtual disk, moving the L1 table if it must grow.

        The new L1 table is written and made durable before the header points
        to it; the old one is freed only after that.
        """
        self._require_writable()
        if new_size < self.size:
            raise UnsupportedFeatureError(f"{self.name}: shrinking is not supported")
        async with self.lock:
            await self.flush_locked()
            need = -(-new_size // (self.cs * self.l2_entries))
            if need * 8 > fmt.MAX_L1_BYTES:
                raise UnsupportedFeatureError(f"{self.name}: {new_size} bytes needs an L1 "
                                              "table over 32 MiB; use larger clusters")
            h = self.header
            old_off, old_clusters = h.l1_table_offset, -(-h.l1_size * 8 // self.cs)
            if need > h.l1_size:
                n_clusters = -(-need * 8 // self.cs)
                start, got = await self.refcounts.allocate(n_clusters)
                while got < n_clusters:  # need a contiguous run: give back and retry further on
                    await self.refcounts.update(start, got, -1)
                    self.refcounts.free_hint = start + got
                    start, got = await self.refcounts.allocate(n_clusters)
                new_l1 = array("Q", self.l1)
                new_l1.extend([0] * (n_clusters * self.cs // 8 - len(new_l1)))
                await self.source.pwrite(start << self.cb, encode_u64(new_l1))
                await self.source.flush()
                self.l1 = new_l1[:need]
                h.l1_size, h.l1_table_offset = need, start << self.cb
            h.size = new_size
            await self.source.pwrite(24, new_size.to_bytes(8, "big"))
            await self.source.pwrite(fmt.OFF_L1_SIZE, h.l1_size.to_bytes(4, "big")
                                     + h.l1_table_offset.to_bytes(8, "big"))
            await self.source.flush()
            if h.l1_table_offset != old_off and old_clusters:
                await self.refcounts.update(old_off >> self.cb, old_clusters, -1)
                await self.source.flush()

    async def rewrite_header(self) -> None:
        """Rewrite the header cluster from ``self.header`` (extensions kept)."""
        self._require_writable()
        h = self.header
        h.refcount_table_offset = self.refcounts.table_offset
        h.refcount_table_clusters = len(self.refcounts.table) * 8 // self.cs
        data = fmt.serialize_header(h)
        await self.source.pwrite(0, data)
        await self.source.flush()

    # -- zeroing and discard ---------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True,
                           fua: bool = False) -> None:
        self._require_writable()
        self.check_range(offset, length)
        async with self.lock:
            await self._zero_or_discard(offset, length, may_unmap=may_unmap, discard=False)
        if fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        self.check_range(offset, length)
        async with self.lock:
            await self._zero_or_discard(offset, length, may_unmap=True, discard=True)

    async def _zero_or_discard(self, offset: int, length: int, *, may_unmap: bool,
                               discard: bool) -> None:
        cs, end = self.cs, offset + length
        first = -(-offset // cs) * cs
        last = end & ~(cs - 1)
        if self.size % cs and end == self.size:
            last = end  # the partial last cluster of the disk counts as whole
        if first >= last:
            first = last = offset  # no whole cluster inside
        if not discard:
            for a, b in ((offset, min(first, end)), (max(last, first), end)):
                if a < b and not await self._reads_zero(a, b - a):
                    await self._write(a, memoryview(bytes(b - a)))
        if first >= last:
            return
        v3 = self.header.version >= 3
        if not v3 and self.has_backing:
            if not discard:
                await self._write_zero_bytes(first, last)
            return
        per, cb = self.l2_entries, self.cb
        pos = first
        while pos < last:
            l1i, l2i = divmod(pos >> cb, per)
            stop = min(last, (l1i + 1) * per * cs)
            if self.l1[l1i] & L1E_OFFSET_MASK == 0 and not v3:
                pos = stop  # v2 without backing: unallocated already reads zeros
                continue
            if self.l1[l1i] & L1E_OFFSET_MASK == 0 and not self.has_backing:
                pos = stop  # nothing allocated, nothing below: already zeros
                continue
            _, table = await self._l2_table_for_write(l1i)
            while pos < stop:
                e = table[l2i]
                keep = (not may_unmap and not discard and v3 and e & OFLAG_COPIED
                        and not e & OFLAG_COMPRESSED and e & L2E_OFFSET_MASK)
                if keep:
                    new = e | OFLAG_ZERO
                else:
                    new = OFLAG_ZERO if v3 and (self.has_backing or not discard) else 0
                    if new == OFLAG_ZERO and not self.has_backing and not e:
                        new = 0  # unallocated without backing already reads zeros
                if new != e:
                    if not keep:
                        self._drop_reference(e)
                    table[l2i] = new
                    self.l2_cache.mark_dirty(table_offset(self, l1i), table)
                pos += cs
                l2i += 1

    async def _reads_zero(self, offset: int, length: int) -> bool:
        runs = await self.map_range(offset, length)
        return all(k == ZERO or (k == UNALLOC and (self.backing is None
                                                    or g >= self.backing.size))
                   for k, g, _, _ in runs)

    async def _write_zero_bytes(self, start: int, stop: int) -> None:
        chunk = bytes(min(stop - start, 1 << 20))
        for pos in range(start, stop, len(chunk)):
            await self._write(pos, memoryview(chunk)[:min(len(chunk), stop - pos)])

    # -- flush and close --------------------------------------------------------

    async def flush(self) -> None:
        if not self.writable:
            return
        async with self.lock:
            await self.flush_locked()

    async def flush_locked(self) -> None:
        """Make everything durable, in the order the module docstring gives."""
        src = self.source
        await src.flush()
        self.unsynced_allocations = False
        if self.l2_cache.dirty:
            await self.l2_cache.flush()
            await src.flush()
        if self.l1_dirty:
            for lo, hi in _ranges(sorted(self.l1_dirty)):
                data = encode_u64(self.l1[lo:hi + 1])
                await src.pwrite(self.header.l1_table_offset + 8 * lo, data)
            self.l1_dirty.clear()
            await src.flush()
        oldest_read = min(self.active_reads, default=self.epoch)
        frees = [f for f in self.pending_frees if f[3] < oldest_read]
        if frees:
            self.pending_frees = [f for f in self.pending_frees if f[3] >= oldest_read]
            for cluster, count, punch, _ in frees:
                await self.refcounts.update(cluster, count, -1)
                if punch and await self.refcounts.get(cluster) == 0:
                    await src.punch_hole(cluster << self.cb, count << self.cb)
            await src.flush()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.writable:
                await self.flush()
        finally:
            await self.source.close()
            if self.backing_ref is not None:
                await self.backing_ref.release()  # closes it if nobody else reads it


def table_offset(img: Qcow2Image, l1i: int) -> int:
    return int(img.l1[l1i]) & L1E_OFFSET_MASK


def _append(out: list[Mapping], kind: int, guest: int, length: int, host: int) -> None:
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
