"""Decompression of compressed clusters (zlib raw deflate, zstd).

Output is bounded to one cluster whatever the input claims, so a hostile
image cannot make a decompressor allocate more than a cluster.
"""

from __future__ import annotations

import io
import zlib

from bootcache.errors import ImageCorruptError
from bootcache.qcow2.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; raise ImageCorruptError unless it yields a full cluster."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            # QEMU writes raw deflate streams (no zlib header).
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = _zstd_decompress(data, cluster_size)
        else:
            raise ImageCorruptError(f"unknown compression type {compression_type}")
    except zlib.error as e:
        raise ImageCorruptError(f"compressed cluster does not decompress: {e}") from e
    if len(out) != cluster_size:
        raise ImageCorruptError(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
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
