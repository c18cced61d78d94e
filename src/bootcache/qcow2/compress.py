"""Decompression of compressed clusters (zlib raw deflate, zstd).

Output is bounded to one cluster whatever the input claims, so a hostile
image cannot make a decompressor allocate more than a cluster.
"""

from __future__ import annotations

import io
import threading
import zlib
from typing import Any

from bootcache.errors import ImageCorruptError
from bootcache.qcow2.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

_local = threading.local()


def decompress_cluster(data: bytes | memoryview, cluster_size: int, compression_type: int, *,
                       checksummed: bool = False) -> bytes:
    """Decompress one cluster; raise ImageCorruptError unless it yields a full cluster.

    ``checksummed``: the cluster must be one zstd frame that carries a content
    checksum, and the checksum must match (published caches, spec 14.2).
    """
    try:
        if checksummed:
            if compression_type != COMPRESSION_ZSTD:
                raise ImageCorruptError("a checksummed cluster must be zstd compressed")
            out = _zstd_checked(data, cluster_size)
        elif compression_type == COMPRESSION_ZLIB:
            # QEMU writes raw deflate streams (no zlib header).
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = _zstd_fast(data, cluster_size) or _zstd_decompress(data, cluster_size)
        else:
            raise ImageCorruptError(f"unknown compression type {compression_type}")
    except zlib.error as e:
        raise ImageCorruptError(f"compressed cluster does not decompress: {e}") from e
    if len(out) != cluster_size:
        raise ImageCorruptError(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def _decompressor() -> Any:
    # One per thread: a context is not thread safe, and making one per
    # cluster costs as much as decompressing it.
    d = getattr(_local, "zstd", None)
    if d is None:
        import zstandard

        d = _local.zstd = zstandard.ZstdDecompressor(max_window_size=1 << 22)
    return d


def _zstd_fast(data: bytes | memoryview, cluster_size: int) -> bytes | None:
    """The first frame's content when it is a whole cluster; None when the
    cluster needs the general path (several frames, or an error to report)."""
    import zstandard

    try:
        out: bytes = _decompressor().decompress(data, max_output_size=cluster_size)
    except zstandard.ZstdError:
        return None
    return out if len(out) == cluster_size else None


def _zstd_checked(data: bytes | memoryview, cluster_size: int) -> bytes:
    import zstandard

    try:
        if not zstandard.get_frame_parameters(data).has_checksum:
            raise ImageCorruptError("compressed cluster has no content checksum")
        # One frame, decoded to its end, so its checksum is verified.
        out: bytes = _decompressor().decompress(data, max_output_size=cluster_size)
    except zstandard.ZstdError as e:
        raise ImageCorruptError(f"compressed cluster does not decompress: {e}") from e
    return out


def _zstd_decompress(data: bytes | memoryview, cluster_size: int) -> bytes:
    # Imported here: zstd images are rare and every command would pay for it.
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 22).stream_reader(
            io.BytesIO(data), read_across_frames=True)
        out: bytes = reader.read(cluster_size)
        while len(out) < cluster_size:
            more = reader.read(cluster_size - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as e:
        raise ImageCorruptError(f"compressed cluster does not decompress: {e}") from e
    return out
