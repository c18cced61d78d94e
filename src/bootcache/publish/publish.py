"""Publish a cache image: its data clusters, compressed, as one verifiable qcow2 file.

Clusters are read in guest order, compressed with zstd on worker threads
(zstandard releases the GIL) and spooled to a temporary file, so their sizes
are known before the artifact is laid out; the artifact is then written
front to back by the sequential writer, hashed on the way, and its digest
patched in last. A local destination is written beside its final name and
renamed into place; an S3 destination is uploaded from a temporary file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bootcache.errors import BootcacheError, ImageFormatError
from bootcache.layers.cache import read_extension
from bootcache.layers.uri import file_path, source_kind
from bootcache.publish.artifact import NOT_COPIED
from bootcache.qcow2 import format as fmt
from bootcache.qcow2 import seqwrite
from bootcache.qcow2.digest_ext import (
    EXT_DIGEST,
    FILE_SHA256_AT,
    FLAG_FRAME_CHECKSUMS,
    LENGTH,
    ContentHasher,
    Digest,
)
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

#: Clusters handed to a worker at once (fewer, larger tasks; bounded memory).
_BATCH_BYTES = 1 << 20
DEFAULT_LEVEL = 3


@dataclass
class PublishResult:
    destination: str
    clusters: int
    raw_bytes: int
    artifact_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "clusters": self.clusters,
                "raw-bytes": self.raw_bytes, "artifact-bytes": self.artifact_bytes,
                "ratio": round(self.artifact_bytes / self.raw_bytes, 4) if self.raw_bytes else 0,
                "seconds": round(self.seconds, 3)}


_local = threading.local()


def _compress(clusters: list[bytes], level: int) -> list[bytes]:
    import zstandard

    comp = getattr(_local, "zstd", None)
    if comp is None or _local.level != level:
        comp = _local.zstd = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                           write_checksum=True)
        _local.level = level
    return [comp.compress(c) for c in clusters]


async def publish(cache_path: str, dest: str, *, level: int = DEFAULT_LEVEL,
                  threads: int | None = None, s3_options: dict[str, Any] | None = None
                  ) -> PublishResult:
    """Publish the cache image ``cache_path`` to ``dest`` (a path or s3://bucket/key)."""
    # The daemon holds a served cache for writing and does not share it with a
    # reader that wants it unchanged: a cache in use is refused here, and
    # published through its daemon instead (publish_image, control API).
    source = FileSource(cache_path)
    try:
        img = await Qcow2Image.open(source, name=cache_path)
        return await publish_image(img, cache_path, dest, level=level, threads=threads,
                                   s3_options=s3_options)
    finally:
        await source.close()


async def publish_image(img: Qcow2Image, name: str, dest: str, *, level: int = DEFAULT_LEVEL,
                        threads: int | None = None, s3_options: dict[str, Any] | None = None
                        ) -> PublishResult:
    """Publish the open cache image ``img`` (called ``name``) to ``dest``.

    ``img`` may be in use (a daemon serving it): its header as last flushed
    and the clusters it holds when the publish starts are published; each one
    holds the base's content, and a cluster evicted meanwhile reads as the
    base's content too, through the image's backing file.
    """
    began = time.monotonic()
    kind = source_kind(dest)
    if kind not in ("file", "s3"):
        raise BootcacheError(f"{dest}: publish writes to a path or an s3:// URL")
    if kind == "file":
        dest = file_path(dest)  # a file:// URI names a path
    head = _artifact_header(img, name)
    local_dir = os.path.dirname(os.path.abspath(dest)) if kind == "file" else None
    if local_dir is not None and not os.access(local_dir, os.W_OK | os.X_OK):
        raise BootcacheError(f"{dest}: cannot write into {local_dir}")
    with tempfile.TemporaryFile(dir=local_dir, prefix=".publish-spool-") as spool:
        clusters, lengths, packed, content = await _compress_all(
            img, spool.fileno(), level, threads or os.cpu_count() or 2)
        spool.flush()
        result = await _write_and_place(head, clusters, lengths, packed, content,
                                        spool.fileno(), dest, kind, s3_options or {})
    result.seconds = time.monotonic() - began
    result.raw_bytes = len(clusters) * img.cs
    return result


def _artifact_header(img: Qcow2Image, name: str) -> fmt.Header:
    """The artifact's header: the cache's facts and extensions, zstd compression."""
    h = img.header
    ext = read_extension(img)
    if ext is None or h.backing_file is None:
        raise ImageFormatError(f"{name}: not a cache image")
    if not h.autoclear_features & fmt.AUTOCLEAR_CACHE:
        raise ImageFormatError(f"{name}: the cache is not known consistent (bit 63 clear: "
                               "a foreign writer opened it); serve it once to revalidate")
    if not ext.identity:
        raise ImageFormatError(f"{name}: the base identity is not recorded yet (the cache was "
                               "never opened by a cache writer)")
    if h.extended_l2 or h.nb_snapshots:
        raise ImageFormatError(f"{name}: caches with extended L2 entries or snapshots cannot "
                               "be published")
    for e in h.extensions:
        if e.type in (fmt.EXT_BITMAPS, fmt.EXT_CRYPTO, fmt.EXT_DATA_FILE):
            raise ImageFormatError(f"{name}: header extension {e.type:#010x} cannot be published")
    out = fmt.Header(version=3, cluster_bits=h.cluster_bits, size=h.size, l1_size=0,
                     l1_table_offset=0, refcount_table_offset=0, refcount_table_clusters=0,
                     incompatible_features=fmt.INCOMPAT_COMPRESSION,
                     autoclear_features=fmt.AUTOCLEAR_CACHE, refcount_order=4,
                     header_length=fmt.OUR_V3_HEADER_LENGTH,
                     compression_type=fmt.COMPRESSION_ZSTD, backing_file=h.backing_file)
    # Verbatim: the cache extension (identity, quota, policy), the backing
    # format, and any extension this code does not know (a boot profile).
    out.extensions = [fmt.Extension(e.type, e.data) for e in h.extensions
                      if e.type not in NOT_COPIED]
    out.extensions.append(fmt.Extension(fmt.EXT_FEATURE_TABLE,
                                        fmt.feature_table_extension(fmt.FEATURE_NAMES)))
    out.extensions.append(fmt.Extension(EXT_DIGEST, bytes(LENGTH)))
    fmt.serialize_header(out)  # fits in one cluster, or a clear error now
    return out


async def _compress_all(img: Qcow2Image, spool: int, level: int, threads: int
                        ) -> tuple[list[int], list[int], list[bool], bytes]:
    """Compress every data cluster into ``spool``: (clusters, lengths, packed, content hash)."""
    cs = img.cs
    clusters = await img.allocated_clusters()
    per_batch = max(_BATCH_BYTES // cs, 1)
    lengths: list[int] = []
    packed: list[bool] = []
    hasher = ContentHasher()
    loop = asyncio.get_running_loop()
    pos = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd") as pool:
        pending: deque[tuple[list[int], list[bytes], Future[list[bytes]]]] = deque()

        def drain_one() -> None:
            nonlocal pos
            batch, raw, fut = pending.popleft()
            for ci, data, small in zip(batch, raw, fut.result(), strict=True):
                hasher.add(ci * cs, data)
                keep = small if len(small) < cs else data
                lengths.append(len(keep))
                packed.append(keep is small)
                os.pwrite(spool, keep, pos)
                pos += len(keep)

        for first in range(0, len(clusters), per_batch):
            batch = clusters[first:first + per_batch]
            raw = [await _read_cluster(img, ci) for ci in batch]
            pending.append((batch, raw, pool.submit(_compress, raw, level)))
            while len(pending) > 2 * threads or (pending and pending[0][2].done()):
                if not pending[0][2].done():
                    await asyncio.wrap_future(pending[0][2], loop=loop)
                drain_one()
        while pending:
            await asyncio.wrap_future(pending[0][2], loop=loop)
            drain_one()
    return clusters, lengths, packed, hasher.digest()


async def _read_cluster(img: Qcow2Image, ci: int) -> bytes:
    cs = img.cs
    off = ci * cs
    data = await img.pread(off, min(cs, img.size - off))
    return data if len(data) == cs else data + bytes(cs - len(data))


async def _write_and_place(head: fmt.Header, clusters: list[int], lengths: list[int],
                           packed: list[bool], content: bytes, spool: int, dest: str,
                           kind: str, s3_options: dict[str, Any]) -> PublishResult:
    layout = seqwrite.plan(head, clusters, lengths, packed)
    head.set_extension(EXT_DIGEST, Digest(file_length=layout.file_length,
                                          data_clusters=len(clusters),
                                          content_sha256=content,
                                          flags=FLAG_FRAME_CHECKSUMS).encode())
    # set_extension moved the digest to the end, where it already was: same layout.
    meta = seqwrite.metadata(layout)
    sha_at = seqwrite.extension_data_offset(meta[:layout.cs], EXT_DIGEST) + FILE_SHA256_AT
    final = os.path.abspath(dest) if kind == "file" else None
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final) if final else None,
                               prefix=f".{os.path.basename(final or 'artifact')}.",
                               suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # as bootcache create makes images, not mkstemp's 0600
        file_hash = hashlib.sha256()
        writer = seqwrite.SequentialWriter(fd, layout, observe=file_hash.update)
        await asyncio.to_thread(_write_all, writer, meta, lengths, spool)
        os.pwrite(fd, file_hash.digest(), sha_at)
        await asyncio.to_thread(os.fsync, fd)
        os.close(fd)
        fd = -1
        if final is not None:
            os.rename(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            from bootcache.sources.s3_upload import upload_file

            await upload_file(tmp, dest, **s3_options)
    except OSError as e:
        raise BootcacheError(f"{dest}: cannot write the published cache: {e.strerror}") from e
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return PublishResult(dest, len(clusters), 0, layout.file_length, 0.0)


def _write_all(writer: seqwrite.SequentialWriter, meta: bytes, lengths: list[int],
               spool: int) -> None:
    writer.write_metadata(meta)
    pos = 0
    chunk = b""
    chunk_at = 0
    for n in lengths:
        if pos + n > chunk_at + len(chunk):
            chunk = os.pread(spool, max(n, 8 << 20), pos)
            chunk_at = pos
        writer.write_data(memoryview(chunk)[pos - chunk_at:pos - chunk_at + n])
        pos += n
    writer.finish()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
