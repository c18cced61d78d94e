"""On-disk structures of qcow2: the header, feature bits and header extensions.

Everything here is pure (bytes in, objects out, and back), so that parsing
hostile input is testable without files. Field meanings follow QEMU's
docs/interop/qcow2.txt; every value read from an image is validated before
anything else trusts it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from bootcache.errors import ImageFormatError, UnsupportedFeatureError

MAGIC = b"QFI\xfb"

# Header layout (big endian). v2 ends after the first struct (72 bytes);
# v3 adds the second (32 bytes) and optional fields after it.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3_TAIL = struct.Struct(">QQQII")
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
COMPRESSION_TYPE_OFFSET = 104
OUR_V3_HEADER_LENGTH = 112  # 104 + compression_type byte, padded to 8

# Byte offsets of header fields that are updated in place.
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE = 48  # offset (8 bytes) then clusters (4 bytes)
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
# QEMU's implementation limits; images beyond them are refused as absurd.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_FILE_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_VIRTUAL_SIZE = 1 << 62

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
#: The bootcache cache extension is consistent with the image (docs/spec/cache-image.md).
AUTOCLEAR_CACHE = 1 << 63

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
#: The bootcache cache-image extension (docs/spec/cache-image.md).
EXT_CACHE = 0x42434143

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

_FEATURE_ENTRY = struct.Struct(">BB46s")
FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2

#: The feature-name table bootcache writes into the images it creates.
FEATURE_NAMES: list[tuple[int, int, str]] = [
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
    (FEATURE_AUTOCLEAR, 63, "bootcache cache extension"),
]

# L1/L2 entry bits.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF


@dataclass
class Extension:
    """A header extension kept as raw bytes (so unknown ones survive rewrites)."""

    type: int
    data: bytes


@dataclass
class Header:
    """The parsed qcow2 header (all fields validated by :func:`parse_header`)."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: Bytes of header fields beyond the ones known here, kept for rewrites.
    extra_fields: bytes = b""
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def backing_format(self) -> str | None:
        ext = self.find_extension(EXT_BACKING_FORMAT)
        if ext is None:
            return None
        # NUL padding counted in the length ends the string, as it does for QEMU
        # (parse_header refused a NUL followed by anything else).
        return ext.data.rstrip(b"\0").decode("utf-8", "replace")

    def find_extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or with None remove) the extension of a type."""
        kept = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            kept.append(Extension(ext_type, data))
        self.extensions = kept

    def feature_names(self) -> dict[tuple[int, int], str]:
        """Names from the image's own feature-name table."""
        ext = self.find_extension(EXT_FEATURE_TABLE)
        names: dict[tuple[int, int], str] = {}
        if ext:
            for i in range(len(ext.data) // _FEATURE_ENTRY.size):
                kind, bit, raw = _FEATURE_ENTRY.unpack_from(ext.data, i * _FEATURE_ENTRY.size)
                names[(kind, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return names


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def parse_header(buf: bytes, file_size: int, *, name: str = "image") -> Header:
    """Parse and validate the header found in the first cluster ``buf``.

    ``file_size`` bounds every offset. Raises ImageFormatError for malformed
    images and UnsupportedFeatureError for valid images using features
    bootcache refuses (unknown incompatible bits, encryption).
    """
    if len(buf) < _HEADER_V2.size or buf[:4] != MAGIC:
        raise ImageFormatError(f"{name}: not a qcow2 image (bad magic)")
    (_, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _HEADER_V2.unpack_from(buf)
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"{name}: unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(
            f"{name}: cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = 1 << cluster_bits
    h = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
               l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off, backing_file_offset=backing_off,
               backing_file_size=backing_size, crypt_method=crypt)
    if len(buf) < cs:
        buf = buf + bytes(cs - len(buf))
    if version == 3:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _HEADER_V3_TAIL.unpack_from(buf, _HEADER_V2.size)
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise ImageFormatError(f"{name}: invalid header_length {h.header_length}")
        if h.refcount_order > 6:
            raise ImageFormatError(f"{name}: refcount_order {h.refcount_order} exceeds 6")
        if h.header_length > COMPRESSION_TYPE_OFFSET:
            h.compression_type = buf[COMPRESSION_TYPE_OFFSET]
            h.extra_fields = bytes(buf[COMPRESSION_TYPE_OFFSET + 1:h.header_length])
    h.extensions = _parse_extensions(buf, h, name)
    _check_features(h, name)
    _check_geometry(h, file_size, name)
    if backing_off and backing_size:
        if backing_size > MAX_BACKING_FILE_NAME:
            raise ImageFormatError(f"{name}: invalid backing file name length {backing_size}")
        if backing_off + backing_size > cs:
            raise ImageFormatError(f"{name}: backing file name lies outside the header cluster")
        raw = _nul_padded_string(bytes(buf[backing_off:backing_off + backing_size]),
                                 f"{name}: backing file name")
        try:
            backing = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ImageFormatError(f"{name}: backing file name is not UTF-8") from e
        # An empty name (all NUL padding) names no backing file, as in QEMU.
        h.backing_file = backing or None
        fmt_ext = h.find_extension(EXT_BACKING_FORMAT)
        if h.backing_file and fmt_ext:
            _nul_padded_string(fmt_ext.data, f"{name}: backing file format name")
    # backing_file_size 0: an empty name, no backing file, whatever the offset says
    # (QEMU reads an empty name and opens no backing file either).
    return h


def _nul_padded_string(raw: bytes, what: str) -> bytes:
    """The string in a NUL-padded field: the bytes before the first NUL.

    QEMU reads these fields as C strings, so trailing NULs are padding to it. A NUL
    followed by other bytes is refused: the stored name and the one QEMU would use
    differ, and which was meant is unknowable.
    """
    text, nul, rest = raw.partition(b"\0")
    if nul and rest.strip(b"\0"):
        raise ImageFormatError(f"{what} contains a NUL byte followed by more bytes")
    return text


def _check_features(h: Header, name: str) -> None:
    unknown = h.incompatible_features & ~KNOWN_INCOMPAT
    if unknown:
        names = h.feature_names() if h.extensions else {}
        bits = [b for b in range(64) if unknown >> b & 1]
        desc = ", ".join(names.get((FEATURE_INCOMPAT, b), f"bit {b}") for b in bits)
        raise UnsupportedFeatureError(f"{name}: unsupported incompatible features: {desc}")
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError(
            f"{name}: images with an external data file are not supported")
    if h.crypt_method:
        raise UnsupportedFeatureError(f"{name}: encrypted images are not supported")
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.compression_type not in COMPRESSION_NAMES or h.compression_type == 0:
            raise UnsupportedFeatureError(
                f"{name}: unknown compression type {h.compression_type}")
    elif h.compression_type != COMPRESSION_ZLIB:
        raise ImageFormatError(
            f"{name}: compression_type {h.compression_type} set without its feature bit")
    if h.extended_l2 and h.cluster_bits < 14:
        raise ImageFormatError(f"{name}: extended L2 entries need clusters of 16 KiB or more")


def _check_geometry(h: Header, file_size: int, name: str) -> None:
    cs = h.cluster_size
    if h.size > MAX_VIRTUAL_SIZE:
        raise ImageFormatError(f"{name}: virtual size {h.size} is absurd")
    entry_bytes = 16 if h.extended_l2 else 8
    l2_entries = cs // entry_bytes
    needed_l1 = -(-h.size // (cs * l2_entries))
    if h.l1_size < needed_l1:
        raise ImageFormatError(
            f"{name}: L1 table too small ({h.l1_size} entries, need {needed_l1})")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageFormatError(f"{name}: L1 table of {h.l1_size} entries is absurd")
    _check_table(h.l1_table_offset, h.l1_size * 8, cs, file_size, "L1 table", name)
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageFormatError(
            f"{name}: refcount table of {h.refcount_table_clusters} clusters is absurd")
    _check_table(h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size,
                 "refcount table", name)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageFormatError(f"{name}: {h.nb_snapshots} snapshots is absurd")
    if h.nb_snapshots:
        _check_table(h.snapshots_offset, 40, cs, file_size, "snapshot table", name)
    if h.l1_size and _overlaps(h.l1_table_offset, h.l1_size * 8, h.refcount_table_offset,
                               h.refcount_table_clusters * cs):
        raise ImageFormatError(f"{name}: L1 table overlaps the refcount table")
    for off, what in ((h.l1_table_offset, "L1 table"), (h.refcount_table_offset,
                                                       "refcount table")):
        if off < cs and (what != "L1 table" or h.l1_size):
            raise ImageFormatError(f"{name}: {what} overlaps the header")


def _check_table(offset: int, length: int, cs: int, file_size: int, what: str,
                 name: str) -> None:
    if length == 0:
        return
    if offset % cs:
        raise ImageFormatError(f"{name}: {what} offset {offset:#x} is not cluster aligned")
    if offset + length > file_size:
        raise ImageFormatError(
            f"{name}: {what} at {offset:#x}+{length} lies beyond the end of the file "
            f"({file_size} bytes)")


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _parse_extensions(buf: bytes, h: Header, name: str) -> list[Extension]:
    # v2 images may carry extensions too, right after the 72-byte header.
    pos = V2_HEADER_LENGTH if h.version == 2 else h.header_length
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, h.cluster_size)
    exts: list[Extension] = []
    seen: set[int] = set()
    while pos + 8 <= end:
        ext_type, length = struct.unpack_from(">II", buf, pos)
        if ext_type == EXT_END:
            break
        if pos + 8 + length > end:
            raise ImageFormatError(
                f"{name}: header extension {ext_type:#010x} of {length} bytes overruns "
                "the header area")
        if ext_type in seen and ext_type in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_CACHE):
            raise ImageFormatError(f"{name}: duplicate header extension {ext_type:#010x}")
        seen.add(ext_type)
        exts.append(Extension(ext_type, bytes(buf[pos + 8:pos + 8 + length])))
        pos += 8 + _pad8(length)
    return exts


def serialize_header(h: Header) -> bytes:
    """Encode the header, its extensions and the backing file name.

    Updates ``backing_file_offset``/``backing_file_size`` in ``h``. The result
    must fit in the first cluster; raises ImageFormatError otherwise.
    """
    if h.version == 2:
        h.header_length = V2_HEADER_LENGTH
    out = bytearray()
    backing = (h.backing_file or "").encode("utf-8")
    out += _HEADER_V2.pack(MAGIC, h.version, 0, 0, h.cluster_bits, h.size, h.crypt_method,
                           h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                           h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version == 3:
        out += _HEADER_V3_TAIL.pack(h.incompatible_features, h.compatible_features,
                                    h.autoclear_features, h.refcount_order, h.header_length)
        if h.header_length > COMPRESSION_TYPE_OFFSET:
            out.append(h.compression_type)
            out += h.extra_fields
        out += bytes(h.header_length - len(out))
    for ext in h.extensions:
        out += struct.pack(">II", ext.type, len(ext.data)) + ext.data
        out += bytes(_pad8(len(ext.data)) - len(ext.data))
    out += bytes(8)  # end-of-extensions marker
    if backing:
        if len(backing) > MAX_BACKING_FILE_NAME:
            raise ImageFormatError(f"backing file name longer than {MAX_BACKING_FILE_NAME} bytes")
        h.backing_file_offset, h.backing_file_size = len(out), len(backing)
        struct.pack_into(">QI", out, 8, len(out), len(backing))
        out += backing
    else:
        h.backing_file_offset = h.backing_file_size = 0
    if len(out) > h.cluster_size:
        raise ImageFormatError(
            f"header, extensions and backing file name ({len(out)} bytes) do not fit in "
            f"one {h.cluster_size}-byte cluster")
    return bytes(out)


def feature_table_extension(entries: list[tuple[int, int, str]]) -> bytes:
    """Encode a feature-name table."""
    return b"".join(_FEATURE_ENTRY.pack(kind, bit, text.encode()) for kind, bit, text in entries)


def l2_entries_per_table(h: Header) -> int:
    return h.cluster_size // (16 if h.extended_l2 else 8)
