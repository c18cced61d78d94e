"""Creating new, empty qcow2 images.

Layout (the same as qemu-img's): the header cluster, the refcount table,
the refcount blocks describing the metadata, then an all-zero L1 table
sized for the virtual disk. Every cluster written is refcounted, so a new
image passes ``qemu-img check`` as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bootcache.errors import BootcacheError, ImageFormatError
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.tables import RefBlock


@dataclass
class CreateOptions:
    """What ``bootcache create -o ...`` can set, with qemu-img's defaults."""

    cluster_size: int = 65536
    compat: str = "1.1"
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_fmt: str | None = None
    extended_l2: bool = False
    #: Extra header extensions (type, data), e.g. the cache extension.
    extensions: tuple[tuple[int, bytes], ...] = ()
    autoclear: int = 0

    def validate(self) -> None:
        cs = self.cluster_size
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise ImageFormatError(
                f"cluster size {cs} must be a power of two between 512 and 2M")
        if self.compat not in ("0.10", "1.1"):
            raise ImageFormatError(f"compat must be 0.10 or 1.1, not {self.compat!r}")
        rb = self.refcount_bits
        if rb not in (1, 2, 4, 8, 16, 32, 64):
            raise ImageFormatError(f"refcount_bits {rb} must be a power of two up to 64")
        if self.compression_type not in ("zlib", "zstd"):
            raise ImageFormatError(f"unknown compression_type {self.compression_type!r}")
        if self.compat == "0.10":
            if rb != 16:
                raise ImageFormatError("compat 0.10 images only support refcount_bits=16")
            if self.lazy_refcounts:
                raise ImageFormatError("lazy_refcounts needs compat 1.1")
            if self.compression_type != "zlib":
                raise ImageFormatError("compression_type needs compat 1.1")
            if self.extended_l2 or self.extensions or self.autoclear:
                raise ImageFormatError("this feature needs compat 1.1")
        if self.extended_l2 and cs < 16384:
            raise ImageFormatError("extended_l2 needs a cluster size of at least 16K")
        if self.backing_fmt and not self.backing_file:
            raise ImageFormatError("backing_fmt given without backing_file")


def build_header(size: int, opts: CreateOptions) -> tuple[fmt.Header, int, int]:
    """The header of a new image, its metadata cluster count and refcount block count."""
    opts.validate()
    if size < 0 or size > fmt.MAX_VIRTUAL_SIZE:
        raise ImageFormatError(f"virtual size {size} is out of range")
    size = round_size(size)
    cs = opts.cluster_size
    cb = cs.bit_length() - 1
    entry = 16 if opts.extended_l2 else 8
    l1_size = -(-size // (cs * (cs // entry)))
    if l1_size * 8 > fmt.MAX_L1_BYTES:
        raise ImageFormatError(
            f"virtual size {size} needs an L1 table over 32 MiB; use larger clusters")
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = cs * 8 // opts.refcount_bits
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    v3 = opts.compat == "1.1"
    h = fmt.Header(
        version=3 if v3 else 2, cluster_bits=cb, size=size, l1_size=l1_size,
        l1_table_offset=(1 + table_clusters + blocks) * cs if l1_size else 0,
        refcount_table_offset=cs, refcount_table_clusters=table_clusters,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        header_length=fmt.OUR_V3_HEADER_LENGTH if v3 else fmt.V2_HEADER_LENGTH,
        backing_file=opts.backing_file)
    if v3:
        if opts.lazy_refcounts:
            h.compatible_features |= fmt.COMPAT_LAZY_REFCOUNTS
        if opts.compression_type == "zstd":
            h.incompatible_features |= fmt.INCOMPAT_COMPRESSION
            h.compression_type = fmt.COMPRESSION_ZSTD
        if opts.extended_l2:
            h.incompatible_features |= fmt.INCOMPAT_EXTL2
        h.autoclear_features = opts.autoclear
    if opts.backing_fmt:
        h.set_extension(fmt.EXT_BACKING_FORMAT, opts.backing_fmt.encode())
    for ext_type, data in opts.extensions:
        h.set_extension(ext_type, data)
    if v3:
        # The feature-name table helps tools that don't know a feature; it is
        # optional, so it is left out when the header cluster is too small.
        h.extensions.append(fmt.Extension(fmt.EXT_FEATURE_TABLE,
                                          fmt.feature_table_extension(fmt.FEATURE_NAMES)))
        try:
            fmt.serialize_header(h)
        except ImageFormatError:
            h.extensions.pop()
    return h, 1 + table_clusters + blocks + l1_clusters, blocks


def round_size(size: int) -> int:
    """Sizes round up to whole 512-byte sectors, as qemu-img rounds them."""
    return -(-size // 512) * 512


def _create_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BootcacheError(f"{path}: cannot create: {e.strerror}") from e


def create_qcow2(path: str, size: int, opts: CreateOptions | None = None) -> None:
    """Create (or overwrite) ``path`` as an empty qcow2 image."""
    opts = opts or CreateOptions()
    h, total, nblocks = build_header(size, opts)
    header_bytes = fmt.serialize_header(h)
    cs = h.cluster_size
    per_block = cs * 8 // h.refcount_bits
    table = bytearray(h.refcount_table_clusters * cs)
    blocks = bytearray()
    for b in range(nblocks):
        blk = RefBlock(bytes(cs), h.refcount_bits)
        for i in range(min(per_block, total - b * per_block)):
            blk.set(i, 1)
        blocks += blk.tobytes()
        off = (1 + h.refcount_table_clusters + b) * cs
        table[8 * b:8 * b + 8] = off.to_bytes(8, "big")
    fd = _create_file(path)
    try:
        os.pwrite(fd, header_bytes, 0)
        os.pwrite(fd, bytes(table), cs)
        os.pwrite(fd, bytes(blocks), (1 + h.refcount_table_clusters) * cs)
        # The L1 table is written (not left as a hole) so that updating it later
        # never needs new disk space: a full disk must not block a flush.
        l1_off = (1 + h.refcount_table_clusters + nblocks) * cs
        os.pwrite(fd, bytes(total * cs - l1_off), l1_off)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_raw(path: str, size: int) -> None:
    """Create (or overwrite) ``path`` as a sparse raw image."""
    fd = _create_file(path)
    try:
        os.ftruncate(fd, round_size(size))
    finally:
        os.close(fd)
