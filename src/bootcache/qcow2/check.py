"""Consistency check and repair, with qemu-img check's semantics.

The check walks every structure that references clusters (header, L1 and L2
tables, data and compressed clusters, refcount structures, snapshots,
bitmaps), counts the references each host cluster should have, and compares
with the stored refcounts: a stored count above the reference count is a
leak (wasted space, harmless); below it is a corruption (a later allocation
could overwrite live data). Repair rewrites refcounts to the counted values.

The check runs on a quiescent image (it flushes first), reads the tables as
they are on disk, and repairs through the engine's own objects: refcounts
through :class:`Refcounts`, OFLAG_COPIED through the cluster map's caches,
so nothing an open image holds goes stale behind its back.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Protocol

from bootcache.errors import ImageCorruptError
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.clustermap import ClusterMap
from bootcache.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
)
from bootcache.qcow2.refcount import Refcounts
from bootcache.qcow2.tables import decode_u64
from bootcache.sources.base import ByteSource

_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
_MAX_REPORTED = 100


class Checked(Protocol):
    """What the check needs of an image (a Qcow2Image has it all)."""

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> ByteSource: ...
    @property
    def header(self) -> Header: ...
    @property
    def map(self) -> ClusterMap: ...
    @property
    def refcounts(self) -> Refcounts: ...
    async def flush(self) -> None: ...


@dataclass
class CheckResult:
    """What ``qemu-img check --output json`` reports, under the same names."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        if len(self.messages) < _MAX_REPORTED:
            self.messages.append(msg)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": "qcow2",
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        return out

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0


class _Counter:
    """Expected reference counts per host cluster, from walking the metadata."""

    def __init__(self, img: Checked, file_size: int, res: CheckResult) -> None:
        self.img, self.res = img, res
        self.cb = img.map.cb
        self.nclusters = (file_size + img.map.cs - 1) >> self.cb
        self.refs = array("I", bytes(4 * self.nclusters))
        #: Highest cluster with a stored refcount (leaks count for the image end).
        self.last_stored = 0

    def add(self, offset: int, length: int, what: str) -> bool:
        if length <= 0:
            return True
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        if last >= self.nclusters:
            self.res.corruptions += 1
            self.res.note(f"ERROR {what} at {offset:#x} lies beyond the end of the image")
            return False
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True


async def check_image(img: Checked, repair: str | None = None) -> CheckResult:
    """Check ``img`` (and with ``repair`` "leaks" or "all", fix what is safe)."""
    await img.flush()  # the disk holds everything the engine knows: read it
    h, cs = img.header, img.map.cs
    file_size = await img.source.size()
    res = CheckResult(filename=img.name, total_clusters=-(-h.size // cs))
    cnt = _Counter(img, file_size, res)
    cnt.add(0, cs, "header")
    cnt.add(h.l1_table_offset, h.l1_size * 8, "L1 table")
    rt = img.refcounts
    cnt.add(rt.table_offset, len(rt.table) * 8, "refcount table")
    for b, off in rt.table.items():
        if off % cs:
            res.corruptions += 1
            res.note(f"ERROR refcount block {b} is not cluster aligned")
        else:
            cnt.add(off, cs, f"refcount block {b}")
    copied_checks: list[tuple[int, int, int, bool]] = []
    await _walk_l1(img, cnt, img.map.l1, active=True, copied=copied_checks)
    await _walk_snapshots(img, cnt)
    await _walk_bitmaps(img, cnt)
    await _compare(img, cnt, res, repair)
    await _check_copied(img, res, copied_checks, repair)
    used = [i for i in range(cnt.nclusters) if cnt.refs[i]]
    last = max(used[-1] if used else 0, cnt.last_stored)
    res.image_end_offset = (last + 1) * cs
    if repair and (res.leaks_fixed or res.corruptions_fixed):
        await img.flush()  # the repairs are durable before anyone relies on them
    return res


async def _walk_l1(img: Checked, cnt: _Counter, l1: array[int], *, active: bool,
                   copied: list[tuple[int, int, int, bool]]) -> None:
    res, cs, m = cnt.res, img.map.cs, img.map
    step = 2 if m.extended else 1
    prev_host = -1
    for l1i, e in enumerate(l1):
        l2off = e & L1E_OFFSET_MASK
        if not l2off:
            continue
        if not cnt.add(l2off, cs, f"L2 table {l1i}"):
            continue
        if active:
            copied.append((l1i, -1, l2off, bool(e & OFLAG_COPIED)))
        table = decode_u64(await img.source.pread(l2off, cs))
        for l2i in range(0, len(table), step):
            le = table[l2i]
            if le & OFLAG_COMPRESSED:
                first, count = m.compressed_clusters(le)
                cnt.add(first << m.cb, count << m.cb, "compressed cluster")
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                continue
            host = le & L2E_OFFSET_MASK
            if not host:
                continue
            if host % cs:
                res.corruptions += 1
                res.note(f"ERROR cluster offset {host:#x} unaligned (L2 table {l2off:#x})")
                continue
            if cnt.add(host, cs, "data cluster") and active:
                if not (le & OFLAG_ZERO and not m.extended):
                    res.allocated_clusters += 1
                if prev_host >= 0 and host != prev_host + cs:
                    res.fragmented_clusters += 1
                prev_host = host
                copied.append((l1i, l2i, host, bool(le & OFLAG_COPIED)))


async def _walk_snapshots(img: Checked, cnt: _Counter) -> None:
    h = img.header
    if not h.nb_snapshots:
        return
    pos = h.snapshots_offset
    file_size = await img.source.size()
    start = pos
    for i in range(h.nb_snapshots):
        raw = await img.source.pread(pos, _SNAPSHOT_ENTRY.size)
        l1_off, l1_size, id_len, name_len, _, _, _, _, extra = _SNAPSHOT_ENTRY.unpack(raw)
        if extra > 1024 or pos > file_size:
            cnt.res.corruptions += 1
            cnt.res.note(f"ERROR snapshot {i} has an invalid table entry")
            return
        pos += _SNAPSHOT_ENTRY.size + extra + id_len + name_len
        pos = (pos + 7) & ~7
        if l1_size * 8 > fmt.MAX_L1_BYTES or l1_off % img.map.cs:
            cnt.res.corruptions += 1
            cnt.res.note(f"ERROR snapshot {i} has an invalid L1 table")
            continue
        if cnt.add(l1_off, l1_size * 8, f"snapshot {i} L1 table") and l1_size:
            l1 = decode_u64(await img.source.pread(l1_off, l1_size * 8))
            await _walk_l1(img, cnt, l1, active=False, copied=[])
    cnt.add(start, pos - start, "snapshot table")


async def _walk_bitmaps(img: Checked, cnt: _Counter) -> None:
    ext = img.header.find_extension(fmt.EXT_BITMAPS)
    if ext is None or len(ext.data) < 24:
        return
    nb, _, dir_size, dir_off = struct.unpack(">IIQQ", ext.data[:24])
    if dir_size > 64 << 20:
        cnt.res.corruptions += 1
        return
    if not cnt.add(dir_off, dir_size, "bitmap directory"):
        return
    raw = await img.source.pread(dir_off, dir_size)
    pos = 0
    for _ in range(nb):
        if pos + _BITMAP_DIR_ENTRY.size > len(raw):
            break
        tab_off, tab_size, _, _, _, name_size, extra = _BITMAP_DIR_ENTRY.unpack_from(raw, pos)
        pos = (pos + _BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
        if tab_size * 8 > 64 << 20 or not cnt.add(tab_off, tab_size * 8, "bitmap table"):
            continue
        for e in decode_u64(await img.source.pread(tab_off, tab_size * 8)):
            off = e & 0x00FFFFFFFFFFFE00
            if off:
                cnt.add(off, img.map.cs, "bitmap data")


async def _compare(img: Checked, cnt: _Counter, res: CheckResult,
                   repair: str | None) -> None:
    rt = img.refcounts
    per = rt.per_block
    covered = len(rt.table) * per
    fixes: list[tuple[int, int]] = []
    for b in range(-(-max(cnt.nclusters, 1) // per)):
        blk = await rt.block(b) if b < len(rt.table) else None
        base = b * per
        for i in range(min(per, cnt.nclusters - base)):
            c = base + i
            stored = blk.get(i) if blk else 0
            if stored:
                cnt.last_stored = c
            want = cnt.refs[c]
            if stored == want:
                continue
            if stored > want:
                res.leaks += 1
                res.note(f"Leaked cluster {c} refcount={stored} reference={want}")
                if repair in ("leaks", "all"):
                    fixes.append((c, want))
            else:
                res.corruptions += 1
                res.note(f"ERROR cluster {c} refcount={stored} reference={want}"
                         + (" (beyond the refcount table)" if c >= covered else ""))
                if repair == "all":
                    fixes.append((c, want))
    # Refcounts stored for clusters past the end of the file are leaks too.
    if fixes:
        rt.in_use = lambda c: c < cnt.nclusters and cnt.refs[c] > 0
        try:
            # Raise counts first so no allocation can land on a live cluster.
            for c, want in sorted(fixes, key=lambda f: -f[1]):
                stored = await rt.get(c)
                await rt.set_exact(c, want)
                if stored > want:
                    res.leaks -= 1
                    res.leaks_fixed += 1
                else:
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
        finally:
            rt.in_use = None
        # New refcount blocks created while repairing are themselves referenced
        # now (they may lie past the clusters counted so far: count them too).
        end = -(-(await img.source.size()) >> img.map.cb)
        for off in rt.block_set:
            c = off >> img.map.cb
            if c >= end:
                continue  # a table entry beyond the file: reported above, left as it is
            if c >= cnt.nclusters:
                cnt.refs.extend([0] * (c + 1 - cnt.nclusters))
                cnt.nclusters = c + 1
            cnt.refs[c] = max(cnt.refs[c], 1)


async def _check_copied(img: Checked, res: CheckResult,
                        entries: list[tuple[int, int, int, bool]], repair: str | None) -> None:
    """OFLAG_COPIED must be set exactly on active entries whose refcount is 1.

    ``entries`` are (L1 index, L2 index or -1 for the L1 entry, host, flag)."""
    fixed = False
    for l1i, l2i, host, has_flag in entries:
        should = await img.refcounts.get(host >> img.map.cb) == 1
        if should == has_flag:
            continue
        res.corruptions += 1
        kind = "L2 table" if l2i < 0 else "data cluster"
        res.note(f"ERROR OFLAG_COPIED {kind} at {host:#x}: refcount does not match")
        if repair != "all":
            continue
        await img.map.set_copied(l1i, None if l2i < 0 else l2i, should)
        fixed = True
        res.corruptions -= 1
        res.corruptions_fixed += 1
    if fixed:
        await img.flush()


__all__ = ["CheckResult", "ImageCorruptError", "check_image"]
