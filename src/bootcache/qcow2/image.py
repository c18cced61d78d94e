"""The qcow2 image as a block layer: opening, reads, writes, flush.

The engine underneath is split as QEMU splits it (docs/design.md, "Write
ordering"): :class:`~bootcache.qcow2.barrier.SyncBarrier` is the one door
for writes, :class:`~bootcache.qcow2.header.HeaderWriter` the one writer of
the header, :class:`~bootcache.qcow2.refcount.Refcounts` allocates,
:class:`~bootcache.qcow2.clustermap.ClusterMap` maps and owns the L2 cache
that depends on the refcounts' barrier, and its free queue releases dropped
clusters. This module only drives them: no write here needs to remember an
ordering rule, the structures enforce it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from contextlib import AbstractContextManager

from bootcache.block.graph import NodeRef
from bootcache.block.layer import NOWAIT_MAX, BlockLayer, Extent, SourceBacked
from bootcache.block.lock import LazyAsyncLock
from bootcache.errors import (
    ImageCorruptError,
    ReadOnlyError,
    StaleBaseError,
    UnsupportedFeatureError,
)
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.barrier import SyncBarrier
from bootcache.qcow2.check import check_image
from bootcache.qcow2.clustermap import COMPRESSED, DATA, UNALLOC, ZERO, ClusterMap, Mapping
from bootcache.qcow2.compress import decompress_cluster
from bootcache.qcow2.format import (
    L2E_OFFSET_MASK,
    L2E_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
)
from bootcache.qcow2.header import HeaderWriter
from bootcache.qcow2.refcount import Refcounts
from bootcache.qcow2.tables import decode_u64
from bootcache.sources.base import ByteSource
from bootcache.sources.version import BaseVersion

__all__ = ["COMPRESSED", "DATA", "UNALLOC", "ZERO", "Mapping", "Qcow2Image"]

_MAX_WRITE_CHUNK = 32 << 20


class Qcow2Image(SourceBacked, BlockLayer):
    """A qcow2 file on a byte source, optionally over a backing layer."""

    #: Its L1, L2 and refcount tables are of the version it was opened on.
    follows_new_versions = False

    def __init__(self, source: ByteSource, header: Header, l1: array[int],
                 refcounts: Refcounts, *, writable: bool, name: str,
                 l2_cache_bytes: int = 32 << 20) -> None:
        self.source = source
        self.name = name
        self.refcounts = refcounts
        self.barrier: SyncBarrier = refcounts.barrier
        self.headers: HeaderWriter = refcounts.headers
        self.map = ClusterMap(refcounts, l1, name=name, l2_cache_bytes=l2_cache_bytes)
        self.writable = writable
        #: The open backing file (None: not opened, or none), held by reference.
        self.backing_ref: NodeRef | None = None
        self.cb = header.cluster_bits
        self.cs = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entries = self.map.l2_entries
        self.lock = LazyAsyncLock()
        self._last_compressed: tuple[int, bytes] | None = None
        self.closed = False
        #: Format decisions follow the header, whether or not the backing is open.
        self.has_backing = header.backing_file is not None
        #: Why reads fail, once the source's content changed under the tables.
        self.stale: str | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def header(self) -> Header:
        """The parsed header (change it only through :attr:`headers`)."""
        return self.headers.header

    @property
    def file_size(self) -> int:
        return self.barrier.file_size

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
        headers = HeaderWriter(header, SyncBarrier(source, file_size))
        refcounts = await Refcounts.load(headers, name=name)
        if not refcounts.table[0]:
            raise ImageCorruptError(f"{name}: the header cluster has no refcount block")
        img = cls(source, header, l1, refcounts, writable=writable, name=name)
        if writable:
            await img._prepare_for_writing(keep_autoclear)
        else:
            # A read-only image may be a base that is replaced under us.
            img._unsubscribe = source.version.subscribe(img)
        return img

    # -- a changing source (sources/version.py) ----------------------------------

    async def base_stale(self, version: BaseVersion) -> None:
        # The tables parsed so far describe the old content: whoever reads this
        # image must open it again (follows_new_versions is False).
        self.stale = f"{self.name}: the qcow2 image changed; open it again"

    async def base_adopted(self, version: BaseVersion) -> None:
        pass

    async def _prepare_for_writing(self, keep_autoclear: int) -> None:
        h = self.header
        if h.version == 3 and h.autoclear_features & ~keep_autoclear:
            await self.headers.set_autoclear(h.autoclear_features & keep_autoclear)
        if h.incompatible_features & fmt.INCOMPAT_DIRTY:
            # Refcounts may be stale (lazy refcounts): rebuild before any allocation.
            result = await check_image(self, repair="all")
            if result.corruptions:
                raise ImageCorruptError(
                    f"{self.name}: dirty image could not be repaired "
                    f"({result.corruptions} corruptions remain)")
            await self.headers.set_incompatible(h.incompatible_features & ~fmt.INCOMPAT_DIRTY)

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
        self.map.l2_cache.drop_clean()
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

    # -- mapping (the cluster map's) --------------------------------------------

    def data_host(self, offset: int, length: int) -> int:
        """Host offset of a range of normal data clusters, contiguous on the
        host and in one cached L2 table, else -1 (no await)."""
        return self.map.data_host(offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        # Lookup and read with no await between them: no release can intervene.
        pread_now = getattr(self.source, "pread_now", None)
        if (pread_now is None or self.stale or offset < 0 or length > NOWAIT_MAX
                or offset + length > self.size):
            return None
        host = self.data_host(offset, length)
        return pread_now(host, length) if host >= 0 else None

    async def map_range(self, offset: int, length: int) -> list[Mapping]:
        """[offset, offset+length) as runs of one kind each (:meth:`ClusterMap.map_range`)."""
        return await self.map.map_range(offset, length)

    def map_range_nowait(self, offset: int, length: int) -> list[Mapping] | None:
        """:meth:`map_range` if the L2 tables it needs are cached, else None (no await)."""
        return None if self.stale else self.map.map_range_nowait(offset, length)

    def compressed_clusters(self, entry: int) -> tuple[int, int]:
        return self.map.compressed_clusters(entry)

    async def allocated_clusters(self, *, zero: bool = False) -> list[int]:
        """Guest clusters with data in this image (with ``zero``: zero clusters)."""
        return await self.map.allocated_clusters(zero=zero)

    def reading(self) -> AbstractContextManager[None]:
        """Mark a read in progress: clusters it may have mapped stay unreleased."""
        return self.map.frees.reading()

    # -- reads ----------------------------------------------------------------

    async def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if self.stale:
            raise StaleBaseError(self.stale)
        with self.map.frees.reading():
            runs = await self.map_range(offset, length)
            if len(runs) == 1:
                return await self.read_mapped(runs[0])
            return b"".join([await self.read_mapped(r) for r in runs])

    async def read_mapped(self, run: Mapping) -> bytes:
        """The bytes of a run :meth:`map_range` returned (inside :meth:`reading`)."""
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

    def read_below_nowait(self, offset: int, length: int) -> bytes | None:
        """:meth:`read_below` when the backing layer reads it without waiting
        (:meth:`BlockLayer.pread_nowait`), else None."""
        below = self.backing
        if below is None or offset >= below.size:
            return bytes(length)
        if offset + length <= below.size:
            return below.pread_nowait(offset, length)
        part = below.pread_nowait(offset, below.size - offset)
        return None if part is None else part + bytes(length - len(part))

    async def _read_compressed(self, entry: int) -> bytes:
        if self._last_compressed and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        x = 62 - (self.cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        nbytes = sectors * 512 - (host & 511)
        if host + nbytes > max(self.barrier.file_size, await self.source.size()) + 512:
            raise ImageCorruptError(
                f"{self.name}: compressed cluster at {host:#x} lies beyond the end")
        data = decompress_cluster(await self.source.pread(host, nbytes), self.cs,
                                  self.header.compression_type)
        self._last_compressed = (entry, data)
        return data

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.stale:
            raise StaleBaseError(self.stale)
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

    async def store_clusters(self, runs: list[tuple[int, bytes | memoryview]]) -> None:
        """Write runs of whole clusters, ``(first cluster, bytes)`` each (the
        last cluster of the disk may be short), under one hold of the lock: a
        cache's batch of stores. Clusters no L2 entry maps yet (a cache's
        usual case) get their host clusters from one allocation for the
        batch and one write per piece contiguous on the host; others go
        through the ordinary write path. An OSError (a full disk) leaves
        mapped exactly what was written (:meth:`map_range` tells) and gives
        back the rest."""
        self._require_writable()
        cb, cs, per, m = self.cb, self.cs, self.l2_entries, self.map
        async with self.lock:
            try:
                # Unmapped clusters, in order: guest cluster -> (run bytes, k-th cluster).
                fresh: dict[int, tuple[memoryview, int]] = {}
                table, table_l1i = None, -1  # the table looked at last (no await since)
                for first, data in runs:
                    self.check_range(first << cb, len(data))
                    view = memoryview(data).cast("B")
                    for k in range(-(-len(view) // cs)):
                        ci = first + k
                        if ci in fresh:
                            fresh[ci] = (view, k)  # stored twice: the later bytes win
                            continue
                        l1i, l2i = divmod(ci, per)
                        if table is None or l1i != table_l1i:
                            table, table_l1i = await m.table_for_write(l1i), l1i
                        if table[l2i]:
                            await self._write(ci << cb, view[k * cs:(k + 1) * cs])
                            table = None
                        else:
                            fresh[ci] = (view, k)
                if fresh:
                    await self._write_fresh(list(fresh.items()))
            except ImageCorruptError:
                await self._mark_corrupt()
                raise

    async def _write_fresh(self, fresh: list[tuple[int, tuple[memoryview, int]]]) -> None:
        """Allocate host clusters for unmapped guest clusters, write their
        bytes (one write per piece contiguous both in its run and on the
        host), then map what was written: data and refcounts complete before
        the L2 entries change, and the cache writes tables back after them."""
        cb, cs, per, m, door = self.cb, self.cs, self.l2_entries, self.map, self.barrier
        extents: list[tuple[int, int]] = []
        try:
            need = len(fresh)
            while need:
                start, got = await m.allocate_data(need)
                extents.append((start, got))
                need -= got
        except BaseException:
            for start, got in extents:
                await self.refcounts.update(start, got, -1)
            raise
        hosts = [c << cb for start, got in extents for c in range(start, start + got)]
        done = 0  # clusters written, in order
        try:
            while done < len(fresh):
                view, k = fresh[done][1]
                j = done + 1
                while j < len(fresh) and fresh[j][1][0] is view and fresh[j][1][1] == k + j - done \
                        and hosts[j] == hosts[done] + ((j - done) << cb):
                    j += 1
                data: bytes | memoryview = view[k * cs:(k + j - done) * cs]
                if len(data) % cs:
                    data = bytes(data) + bytes(cs - len(data) % cs)  # the disk's short end
                await door.pwrite(hosts[done], data)
                done = j
        finally:
            for host in hosts[done:]:
                # Nothing references these: give them back (a full disk would
                # otherwise stay full).
                await self.refcounts.update(host >> cb, 1, -1)
                await door.punch_hole(host, cs)
            n = 0
            while n < done:
                # Tables are looked up now, not kept from before: the awaits
                # above may have evicted (and reloaded) them.
                l1i = fresh[n][0] // per
                table = await m.table_for_write(l1i)
                while n < done and fresh[n][0] // per == l1i:
                    l2i = fresh[n][0] % per
                    m.drop_reference(table[l2i])
                    table[l2i] = hosts[n] | OFLAG_COPIED
                    n += 1
                m.touch(l1i, table)  # written back after the data and refcounts are durable

    async def _write(self, offset: int, view: memoryview) -> None:
        """Write within the lock: in place where a cluster is ours, else allocate."""
        cb, cs, per, m, door = self.cb, self.cs, self.l2_entries, self.map, self.barrier
        pos, end = offset, offset + len(view)
        while pos < end:
            l1i, l2i = divmod(pos >> cb, per)
            table = await m.table_for_write(l1i)
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
                        m.touch(l1i, table)
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
                    await door.pwrite(host, view[pos - offset:run_end - offset])
                    pos, l2i = run_end, j
                    continue
                # Allocate fresh clusters for a run of clusters that need them.
                j = l2i + 1
                while run_end < table_end and not self._writable_in_place(table[j], j):
                    run_end = min(table_end, run_end + cs)
                    j += 1
                first_ci = pos >> cb
                start, got = await m.allocate_data(((run_end - 1) >> cb) - first_ci + 1)
                stop = min(run_end, (first_ci + got) << cb)
                buf = await self._full_clusters(table, l2i, pos, stop,
                                                view[pos - offset:stop - offset])
                host = start << cb
                try:
                    await door.pwrite(host, buf)
                except BaseException:
                    # Nothing references the new clusters yet: give them back
                    # (on a full disk, leaking them would keep it full).
                    await self.refcounts.update(start, got, -1)
                    await door.punch_hole(host, got << cb)
                    raise
                for k in range(got):
                    m.drop_reference(table[l2i + k])
                    table[l2i + k] = (host + (k << cb)) | OFLAG_COPIED
                m.touch(l1i, table)  # written back after the data and refcounts are durable
                pos, l2i = stop, l2i + got

    def _writable_in_place(self, e: int, ci: int) -> bool:
        if not e & OFLAG_COPIED or e & OFLAG_COMPRESSED:
            return False
        if e & L2E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.name}: L2 entry for cluster {ci} has reserved bits set")
        host = e & L2E_OFFSET_MASK
        if not host or self.map.is_metadata(host):
            raise ImageCorruptError(
                f"{self.name}: data cluster {ci} maps to metadata at {host:#x}; refusing to write")
        if host >= self.barrier.file_size:
            # Data reaches the file before the L2 entry naming it, so an entry past
            # the end is damage; writing there could grow the file by terabytes.
            raise ImageCorruptError(
                f"{self.name}: data cluster {ci} maps to {host:#x}, beyond the end of the "
                f"image file; refusing to write")
        return True

    async def _fill_zero_cluster(self, e: int, pos: int, piece: memoryview) -> None:
        """Write into a preallocated zero cluster: zeros around the new bytes."""
        cs = self.cs
        start = pos & ~(cs - 1)
        buf = bytearray(cs)
        buf[pos - start:pos - start + len(piece)] = piece
        await self.barrier.pwrite(e & L2E_OFFSET_MASK, buf)

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
        kind, host = self.map.classify(e, guest >> self.cb)
        if kind == DATA:
            return await self.source.pread(host, self.cs)
        if kind == ZERO:
            return bytes(self.cs)
        if kind == COMPRESSED:
            return await self._read_compressed(e)
        length = min(self.cs, self.size - guest)
        return await self.read_below(guest, length) + bytes(self.cs - length)

    async def _mark_corrupt(self) -> None:
        """Set the corrupt bit and stop writing, as QEMU does on finding
        metadata it must not trust: the image needs a check before reuse."""
        h = self.header
        if self.writable and h.version >= 3:
            try:
                await self.headers.set_incompatible(
                    h.incompatible_features | fmt.INCOMPAT_CORRUPT)
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
            await self.map.unmap(clusters)

    async def unmap_all(self) -> int:
        """Make every data and zero cluster unallocated; returns how many."""
        self._require_writable()
        async with self.lock:
            clusters = await self.allocated_clusters() + await self.allocated_clusters(zero=True)
            await self.map.unmap(clusters)
            return len(clusters)

    async def grow(self, new_size: int) -> None:
        """Enlarge the virtual disk (:meth:`ClusterMap.grow`)."""
        self._require_writable()
        if new_size < self.size:
            raise UnsupportedFeatureError(f"{self.name}: shrinking is not supported")
        async with self.lock:
            await self.map.grow(new_size)

    async def rewrite_header(self) -> None:
        """Rewrite the header cluster from ``self.header`` (extensions kept)."""
        self._require_writable()
        await self.headers.rewrite()

    async def update_header(self, extensions: dict[int, bytes | None], *,
                            autoclear_set: int = 0,
                            adjust: Callable[[Header], None] | None = None) -> None:
        """Replace header extensions and set autoclear bits in one header
        rewrite (:meth:`HeaderWriter.rewrite_with`)."""
        self._require_writable()
        await self.headers.rewrite_with(extensions, autoclear_set=autoclear_set, adjust=adjust)

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
        if self.header.version < 3 and self.has_backing:
            if not discard:
                await self._write_zero_bytes(first, last)
            return
        await self.map.zero_clusters(first, last, may_unmap=may_unmap, discard=discard,
                                     has_backing=self.has_backing)

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
        """Make everything durable (the cluster map orders the steps)."""
        await self.map.flush()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.writable:
                await self.flush()
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
            await self.source.stop_watching()
            await self.source.close()
            if self.backing_ref is not None:
                await self.backing_ref.release()  # closes it if nobody else reads it
