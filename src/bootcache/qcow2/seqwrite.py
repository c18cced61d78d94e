"""Write a whole qcow2 image front to back, in one pass, when its clusters are known.

The general engine (image.py) allocates as it goes; an image whose content is
known before it is written (a published cache, a cache pulled from one) is
better laid out once: the header cluster, the L1 table, the refcount table
and blocks, the L2 tables, then the data clusters in guest order. Data may be
compressed clusters (packed back to back, as qcow2 allows) or standard ones.

Layout (every region starts on a cluster boundary):

    header | L1 table | refcount table | refcount blocks | L2 tables | data

Refcounts follow qemu-img check's reckoning: every metadata cluster and
standard data cluster counts once; a compressed cluster counts once in every
host cluster its sector-rounded byte range touches.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bootcache.errors import ImageFormatError
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.tables import RefBlock

_SECTOR = 512
#: O_DIRECT writes: offsets, lengths and memory aligned to this (any device's
#: logical block), from one staging buffer of _STAGE bytes.
_DIRECT_ALIGN = 4096
_STAGE = 4 << 20


def open_direct(path: str) -> int:
    """A descriptor writing ``path`` around the page cache, or -1 where the file
    system does not support that (tmpfs).

    A pulled cache is written once and made durable at once: through the page
    cache every byte is copied into fresh pages only to be written back before
    the pull ends, and on a VM whose memory the host has not backed yet those
    pages cost far more than the disk (BENCHMARKS.md, "Published caches").
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return -1
        raise


@dataclass
class Layout:
    """Where everything of an image goes; made by :func:`plan`."""

    header: fmt.Header
    #: Guest cluster indices with data, increasing.
    clusters: list[int]
    #: Stored length of each data cluster (the cluster size for standard ones).
    lengths: list[int]
    compressed: list[bool]
    #: Host offset of each data cluster.
    offsets: list[int] = field(default_factory=list)
    #: L1 index -> host offset of its L2 table.
    l2_tables: dict[int, int] = field(default_factory=dict)
    data_start: int = 0
    file_length: int = 0
    refcount_blocks: int = 0

    @property
    def cs(self) -> int:
        return self.header.cluster_size

    def l2_entry(self, i: int) -> int:
        """The L2 entry of the i-th data cluster."""
        off = self.offsets[i]
        if not self.compressed[i]:
            return fmt.OFLAG_COPIED | off
        cb = self.header.cluster_bits
        x = 62 - (cb - 8)
        extra = ((off + self.lengths[i] - 1) >> 9) - (off >> 9)
        return fmt.OFLAG_COMPRESSED | (extra << x) | off

    def compressed_span(self, i: int) -> tuple[int, int]:
        """The host byte range a reader takes for a compressed cluster: from its
        offset to the end of its last sector (what the L2 entry can say)."""
        off = self.offsets[i]
        end = -(-(off + self.lengths[i]) // _SECTOR) * _SECTOR
        return off, end


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def plan(header: fmt.Header, clusters: Sequence[int], lengths: Sequence[int],
         compressed: Sequence[bool]) -> Layout:
    """Lay out an image whose data clusters (increasing guest indices) are known.

    ``header`` gives version 3, cluster size, virtual size, backing file,
    extensions and feature bits; its table fields are filled in here.
    """
    cs = header.cluster_size
    if header.version != 3 or header.refcount_order != 4:
        raise ImageFormatError("sequential writer: only qcow2 v3 with 16-bit refcounts")
    if any(b <= a for a, b in itertools.pairwise(clusters)):
        raise ImageFormatError("sequential writer: data clusters must be increasing")
    per_l2 = fmt.l2_entries_per_table(header)
    total_clusters = -(-header.size // cs)
    if clusters and clusters[-1] >= total_clusters:
        raise ImageFormatError("sequential writer: a data cluster lies beyond the disk")
    header.l1_size = -(-header.size // (cs * per_l2))
    if header.l1_size * 8 > fmt.MAX_L1_BYTES:
        raise ImageFormatError("sequential writer: L1 table over 32 MiB")
    layout = Layout(header, list(clusters), list(lengths), list(compressed))
    # Data first, relative to the start of the data area: cluster-aligned
    # regions keep their alignment when the area is shifted.
    rel: list[int] = []
    pos = 0
    for length, packed in zip(lengths, compressed, strict=True):
        if not packed:
            if length != cs:
                raise ImageFormatError("sequential writer: a standard cluster is one cluster")
            pos = _align(pos, cs)
        elif not 0 < length < cs:
            raise ImageFormatError("sequential writer: a compressed cluster must be shorter "
                                   "than a cluster")
        rel.append(pos)
        pos += length
    data_clusters = _align(pos, cs) // cs
    l1_clusters = -(-header.l1_size * 8 // cs)
    l2_indices = sorted({ci // per_l2 for ci in clusters})
    per_block = cs * 8 // 16
    blocks, table = 1, 1
    while True:
        total = 1 + l1_clusters + table + blocks + len(l2_indices) + data_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_table <= table:
            break
        blocks, table = max(blocks, need_blocks), max(table, need_table)
    header.l1_table_offset = cs
    header.refcount_table_offset = (1 + l1_clusters) * cs
    header.refcount_table_clusters = table
    layout.refcount_blocks = blocks
    l2_start = (1 + l1_clusters + table + blocks) * cs
    layout.l2_tables = {l1i: l2_start + k * cs for k, l1i in enumerate(l2_indices)}
    layout.data_start = l2_start + len(l2_indices) * cs
    layout.offsets = [layout.data_start + r for r in rel]
    layout.file_length = layout.data_start + data_clusters * cs
    return layout


def metadata(layout: Layout) -> bytes:
    """Everything before the data area: header, L1, refcounts, L2 tables."""
    h = layout.header
    cs = layout.cs
    head = fmt.serialize_header(h)
    out = bytearray(layout.data_start)
    out[:len(head)] = head
    per_l2 = fmt.l2_entries_per_table(h)
    l2: dict[int, bytearray] = {l1i: bytearray(cs) for l1i in layout.l2_tables}
    for i, ci in enumerate(layout.clusters):
        struct.pack_into(">Q", l2[ci // per_l2], (ci % per_l2) * 8, layout.l2_entry(i))
    for l1i, off in layout.l2_tables.items():
        struct.pack_into(">Q", out, h.l1_table_offset + l1i * 8, fmt.OFLAG_COPIED | off)
        out[off:off + cs] = l2[l1i]
    counts = _refcounts(layout)
    per_block = cs * 8 // 16
    first_block = h.refcount_table_offset + h.refcount_table_clusters * cs
    for b in range(layout.refcount_blocks):
        blk = RefBlock(bytes(cs), 16)
        for i, n in enumerate(counts[b * per_block:(b + 1) * per_block]):
            if n:
                blk.set(i, n)
        block_off = first_block + b * cs
        out[block_off:block_off + cs] = blk.tobytes()
        struct.pack_into(">Q", out, h.refcount_table_offset + b * 8, block_off)
    return bytes(out)


def _refcounts(layout: Layout) -> list[int]:
    cs = layout.cs
    counts = [1] * (layout.data_start // cs) + [0] * ((layout.file_length - layout.data_start)
                                                      // cs)
    for i in range(len(layout.clusters)):
        if layout.compressed[i]:
            start, end = layout.compressed_span(i)
            for c in range(start // cs, (end - 1) // cs + 1):
                counts[c] += 1
        else:
            counts[layout.offsets[i] // cs] += 1
    if max(counts, default=0) > 0xFFFF:
        raise ImageFormatError("sequential writer: a host cluster needs a refcount over 65535")
    return counts


def extension_data_offset(head: bytes, ext_type: int) -> int:
    """Offset in the header cluster of the data of extension ``ext_type``."""
    pos: int = struct.unpack_from(">I", head, 100)[0]  # header_length (v3)
    while pos + 8 <= len(head):
        t, n = struct.unpack_from(">II", head, pos)
        if t == fmt.EXT_END:
            break
        if t == ext_type:
            return int(pos + 8)
        pos += 8 + _align(n, 8)
    raise ImageFormatError(f"header extension {ext_type:#010x} not found")


class SequentialWriter:
    """Writes a planned image through ``fd``: metadata, then data in order.

    Every byte goes out in increasing file order (and through ``observe``,
    which sees the file as it is written, padding included).
    """

    def __init__(self, fd: int, layout: Layout,
                 observe: Callable[[bytes | memoryview], None] | None = None,
                 sync_every: int = 0, direct_fd: int = -1) -> None:
        """``sync_every``: make the file durable after about that many bytes,
        as it is written (so the last sync has little left to do).
        ``direct_fd``: the same file opened by ``open_direct``; whole aligned
        stretches are then written through it, from a staging buffer."""
        self.fd = fd
        self._direct_fd = direct_fd
        self._stage = mmap.mmap(-1, _STAGE) if direct_fd >= 0 else None
        self._staged = 0  # bytes in the staging buffer
        self._stage_at = 0  # file offset of its first byte
        self.layout = layout
        self._observe = observe
        self._sync_every = sync_every
        self._unsynced = 0
        self._pos = 0
        self._next = 0
        #: Pieces not written yet (kept as given: no copy into one buffer).
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0

    def write_metadata(self, meta: bytes) -> None:
        assert self._pos == 0 and len(meta) == self.layout.data_start
        self._emit(meta)

    def write_data(self, payload: bytes | memoryview) -> None:
        """The next data cluster's stored bytes (compressed or a whole cluster)."""
        i = self._next
        lay = self.layout
        if len(payload) != lay.lengths[i]:
            raise ValueError(f"data cluster {i}: {len(payload)} bytes, planned {lay.lengths[i]}")
        self._pad_to(lay.offsets[i])
        self._emit(payload)
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self.layout.clusters):
            raise ValueError("sequential writer: not every data cluster was written")
        self._pad_to(self.layout.file_length)
        self._drain()
        if self._stage is not None:
            whole = self._staged - self._staged % _DIRECT_ALIGN
            view = memoryview(self._stage)
            _pwrite_all(self._direct_fd, view[:whole], self._stage_at)
            _pwrite_all(self.fd, view[whole:self._staged], self._stage_at + whole)
            view.release()
            self._stage.close()
            self._stage = None
        os.ftruncate(self.fd, self.layout.file_length)

    def _pad_to(self, offset: int) -> None:
        if offset > self._pos:
            self._emit(bytes(offset - self._pos))

    def _emit(self, data: bytes | memoryview) -> None:
        if self._observe is not None:
            self._observe(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._pos += len(data)
        # Direct writes go out a staging buffer at a time, so what is left for
        # finish() (after the last data) is at most one buffer.
        limit = _STAGE if self._stage is not None else 8 << 20
        if self._pending_bytes >= limit or len(self._pending) >= 512:
            self._drain()

    def _drain(self) -> None:
        if self._stage is not None:
            self._drain_direct(self._stage)
            return
        at = self._pos - self._pending_bytes
        views = [memoryview(p) for p in self._pending]
        while views:
            done = os.pwritev(self.fd, views, at)
            at += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if done:
                views[0] = views[0][done:]
        self._unsynced += self._pending_bytes
        self._pending = []
        self._pending_bytes = 0
        if self._sync_every and self._unsynced >= self._sync_every:
            os.fdatasync(self.fd)
            self._unsynced = 0

    def _drain_direct(self, stage: mmap.mmap) -> None:
        for piece in self._pending:
            view = memoryview(piece).cast("B")
            while view:
                n = min(len(view), _STAGE - self._staged)
                stage[self._staged:self._staged + n] = view[:n]
                self._staged += n
                view = view[n:]
                if self._staged == _STAGE:
                    _pwrite_all(self._direct_fd, stage, self._stage_at)
                    self._stage_at += _STAGE
                    self._staged = 0
                    self._unsynced += _STAGE
        self._pending = []
        self._pending_bytes = 0
        if self._sync_every and self._unsynced >= self._sync_every:
            # Direct writes leave the data on the device, but the file's new
            # blocks are recorded at a sync: done as it goes, the last has little left.
            os.fdatasync(self.fd)
            self._unsynced = 0


def _pwrite_all(fd: int, data: bytes | memoryview | mmap.mmap, at: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, at)
        at += done
        view = view[done:]
