"""A byte source that records the engine's writes and syncs, and judges each
write against what a crash at that instant could leave on disk.

It sits at the engine's I/O boundary (the source a Qcow2Image is opened on)
over a real file. It keeps two images of the file: the *durable* one (every
write up to the last sync) and the *live* one (the file itself, all writes
so far). A write that is not yet synced may or may not survive a crash, so a
pointer written to disk must only point to things that are durable already.
Each write is checked before it reaches the file:

- a changed L2 entry (in any table the durable or live L1 references) must
  point to a cluster whose refcount is durably nonzero and whose content has
  no unsynced write;
- a changed L1 entry must point to an L2 table that is durably allocated and
  durably written;
- a changed refcount table entry, or a header that points to a new refcount
  table or L1 table, must point to durably written clusters;
- a refcount that drops to zero must belong to a cluster that neither the
  durable nor the live metadata references any more.

It reads the qcow2 layout itself (version 3, refcounts of 8 bits or more,
standard L2 entries), independently of the engine's modules.
"""

from __future__ import annotations

import struct
from typing import Any

from bootcache.sources.base import ByteSource

_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62


class _Layout:
    """Reads the qcow2 structures of one state of the file through ``read``."""

    def __init__(self, read: Any) -> None:
        self.read = read
        hdr = read(0, 104)
        self.cb = struct.unpack_from(">I", hdr, 20)[0]
        self.cs = 1 << self.cb
        self.l1_size, self.l1_offset, self.rt_offset, self.rt_clusters = \
            struct.unpack_from(">IQQI", hdr, 36)
        self.bits = 1 << struct.unpack_from(">I", hdr, 96)[0]
        assert self.bits >= 8, "the recorder reads refcounts of 8 bits or more"
        self.per_block = self.cs * 8 // self.bits

    def l1(self) -> list[int]:
        raw = self.read(self.l1_offset, 8 * self.l1_size)
        return [e & _OFFSET_MASK for e in struct.unpack(f">{self.l1_size}Q", raw)]

    def l2_tables(self) -> set[int]:
        return {off for off in self.l1() if off}

    def l2_entries(self, table: int) -> list[int]:
        return list(struct.unpack(f">{self.cs // 8}Q", self.read(table, self.cs)))

    def rt_entries(self) -> list[int]:
        n = self.rt_clusters * self.cs // 8
        return list(struct.unpack(f">{n}Q", self.read(self.rt_offset, 8 * n)))

    def block_of(self, cluster: int) -> int:
        b = cluster // self.per_block
        if b >= self.rt_clusters * self.cs // 8:
            return 0
        return int.from_bytes(self.read(self.rt_offset + 8 * b, 8), "big") & ~0x1FF

    def refcount(self, cluster: int) -> int:
        block = self.block_of(cluster)
        if not block:
            return 0
        width = self.bits // 8
        i = cluster % self.per_block
        return int.from_bytes(self.read(block + i * width, width), "big")

    def referenced(self) -> set[int]:
        """Clusters the metadata points to (tables and data)."""
        cs, out = self.cs, {0}
        out |= {(self.l1_offset + k) >> self.cb for k in range(0, max(8 * self.l1_size, 1), cs)}
        out |= {(self.rt_offset + k) >> self.cb for k in range(0, self.rt_clusters * cs, cs)}
        out |= {e >> self.cb for e in self.rt_entries() if e}
        for table in self.l2_tables():
            out.add(table >> self.cb)
            for e in self.l2_entries(table):
                if not e & _COMPRESSED and e & _OFFSET_MASK:
                    out.add((e & _OFFSET_MASK) >> self.cb)
        return out


class RecordingSource(ByteSource):
    """Passes every call to ``inner`` and records ordering violations."""

    def __init__(self, inner: ByteSource, initial: bytes) -> None:
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.durable = bytearray(initial)
        self.pending: list[tuple[int, bytes]] = []
        self.violations: list[str] = []
        self.writes = 0
        self.syncs = 0
        # referenced() is costly: kept per state until pointers change.
        self._meta_version = 0
        self._referenced: dict[tuple[object, ...], set[int]] = {}
        #: L2 tables judged: written while reachable, or made reachable.
        self.l2_writes = 0

    # -- the two states ------------------------------------------------------

    def _read_durable(self, off: int, n: int) -> bytes:
        part = bytes(self.durable[off:off + n])
        return part + bytes(n - len(part))

    def _read_live(self, off: int, n: int) -> bytes:
        buf = bytearray(self._read_durable(off, n))
        for woff, data in self.pending:
            lo, hi = max(off, woff), min(off + n, woff + len(data))
            if lo < hi:
                buf[lo - off:hi - off] = data[lo - woff:hi - woff]
        return bytes(buf)

    def _unsynced(self, off: int, n: int) -> bool:
        return any(woff < off + n and off < woff + len(d) for woff, d in self.pending)

    # -- judging a write -------------------------------------------------------

    def _bad(self, what: str) -> None:
        self.violations.append(f"write {self.writes}: {what}")

    def _pointee_durable(self, what: str, target: int, length: int, durable: _Layout) -> None:
        for c in range(target >> durable.cb, (target + length - 1 >> durable.cb) + 1):
            if durable.refcount(c) == 0:
                self._bad(f"{what} points to cluster {c}, whose refcount is not durable")
        if self._unsynced(target, length):
            self._bad(f"{what} points to {target:#x}, whose content is not durable")

    def _judge_table_reached(self, table: int, durable: _Layout) -> None:
        """A table that becomes reachable: what its durable entries point to is
        durably allocated (it may have been written while unreachable)."""
        self.l2_writes += 1
        for i, e in enumerate(durable.l2_entries(table)):
            host = e & _OFFSET_MASK
            if host and not e & _COMPRESSED and durable.refcount(host >> durable.cb) == 0:
                self._bad(f"L1 makes table {table:#x} reachable; its entry {i} points to "
                          f"cluster {host >> durable.cb}, whose refcount is not durable")

    def _judge(self, off: int, data: bytes) -> None:
        durable, live = _Layout(self._read_durable), _Layout(self._read_live)
        cs, end = live.cs, off + len(data)
        meta_before = self.l2_writes, len(self.violations)
        # L2 tables
        for table in sorted(durable.l2_tables() | live.l2_tables()):
            if table < end and off < table + cs:
                self.l2_writes += 1
                old = live.l2_entries(table)
                lo, hi = max(off, table), min(end, table + cs)
                buf = bytearray(self._read_live(table, cs))
                buf[lo - table:hi - table] = data[lo - off:hi - off]
                new = struct.unpack(f">{cs // 8}Q", buf)
                for i, (a, b) in enumerate(zip(old, new, strict=True)):
                    host = b & _OFFSET_MASK
                    if a != b and host and not b & _COMPRESSED:
                        self._pointee_durable(f"L2 entry {i} of table {table:#x}", host, cs,
                                              durable)
        def written(pos: int) -> int:  # the u64 at ``pos`` once this write is done
            buf = bytearray(self._read_live(pos, 8))
            for k in range(8):
                if off <= pos + k < end:
                    buf[k] = data[pos + k - off]
            return int.from_bytes(buf, "big")

        def changed_u64(start: int, length: int) -> list[tuple[int, int]]:
            lo, hi = max(off, start), min(end, start + length)
            first = lo - (lo - start) % 8
            return [(pos, written(pos)) for pos in range(first, hi, 8)
                    if written(pos) != int.from_bytes(self._read_live(pos, 8), "big")]

        # L1 entries (either state's table)
        for l1_offset, l1_size in {(lay.l1_offset, lay.l1_size) for lay in (durable, live)}:
            for pos, new in changed_u64(l1_offset, 8 * l1_size):
                self._meta_version += 1
                table = new & _OFFSET_MASK
                if table:
                    self._pointee_durable(f"L1 entry {(pos - l1_offset) // 8}", table, cs,
                                          durable)
                    self._judge_table_reached(table, durable)
        # refcount table entries
        for rt_offset, rt_clusters in {(lay.rt_offset, lay.rt_clusters)
                                       for lay in (durable, live)}:
            for _, new in changed_u64(rt_offset, rt_clusters * cs):
                self._meta_version += 1
                if new & ~0x1FF and self._unsynced(new & ~0x1FF, cs):
                    self._bad(f"refcount table entry points to {new & ~0x1FF:#x}, not durable")
        # header pointers
        if (self.l2_writes, len(self.violations)) != meta_before or off < 64:
            self._meta_version += 1
        if off < 64:
            hdr = bytearray(self._read_live(0, 64))
            hdr[off:min(end, 64)] = data[:min(end, 64) - off]
            l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", hdr, 36)
            if (l1_off, l1_size) != (live.l1_offset, live.l1_size) and l1_size:
                self._pointee_durable("the header's L1 table", l1_off, 8 * l1_size, durable)
            if (rt_off, rt_clusters) != (live.rt_offset, live.rt_clusters) and \
                    self._unsynced(rt_off, rt_clusters * cs):
                self._bad("the header points to a refcount table that is not durable")
        # refcounts dropping to zero
        self._judge_frees(off, data, durable, live)

    def _judge_frees(self, off: int, data: bytes, durable: _Layout, live: _Layout) -> None:
        width = live.bits // 8
        end = off + len(data)
        for b, block in enumerate(live.rt_entries()):
            block &= ~0x1FF
            if not block or not (block < end and off < block + live.cs):
                continue
            lo, hi = max(off, block), min(end, block + live.cs)
            freed = []
            for pos in range(lo - (lo - block) % width, hi, width):
                i = (pos - block) // width
                old = int.from_bytes(self._read_live(pos, width), "big")
                new = int.from_bytes(data[pos - off:pos - off + width], "big") \
                    if pos >= off and pos + width <= end else old
                if old and not new:
                    freed.append(b * live.per_block + i)
            if freed:
                still = self._cached_referenced(("durable", self.syncs), durable) | \
                    self._cached_referenced(("live", self.syncs, self._meta_version), live)
                for c in freed:
                    if c in still:
                        self._bad(f"cluster {c} freed while the metadata still points to it")

    def _cached_referenced(self, key: tuple[object, ...], lay: _Layout) -> set[int]:
        if key not in self._referenced:
            self._referenced = {k: v for k, v in self._referenced.items()
                                if k[0] != key[0]}
            self._referenced[key] = lay.referenced()
        return self._referenced[key]

    # -- ByteSource ------------------------------------------------------------

    async def size(self) -> int:
        return await self.inner.size()

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.inner.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        self.writes += 1
        self._judge(offset, data)
        await self.inner.pwrite(offset, data)
        self.pending.append((offset, data))

    async def punch_hole(self, offset: int, length: int) -> bool:
        self.writes += 1
        self._judge(offset, bytes(length))
        done = await self.inner.punch_hole(offset, length)
        if done:
            self.pending.append((offset, bytes(length)))
        return done

    async def flush(self) -> None:
        await self.inner.flush()
        self.syncs += 1
        for off, data in self.pending:
            if len(self.durable) < off + len(data):
                self.durable.extend(bytes(off + len(data) - len(self.durable)))
            self.durable[off:off + len(data)] = data
        self.pending.clear()

    async def truncate(self, length: int) -> None:
        await self.inner.truncate(length)

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    async def close(self) -> None:
        await self.inner.close()
