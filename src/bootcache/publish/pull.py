"""Pull a published cache: verify it, and make it a normal cache image, atomically.

The artifact is read in one forward pass as it arrives: its metadata, then
its data clusters, which are decompressed on worker threads and written in
guest order, uncompressed, into a temporary cache image beside the
destination (same quota, policy, identity and extensions). Meanwhile the
whole file is hashed. Only when the file digest and the content digest both
match is the temporary image made durable and linked into place; any
failure removes it, so the destination never holds half a cache.

Before any data is fetched the artifact's base identity is compared with the
identity of the base the cache will use, computed as a cache computes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import importlib
import logging
import os
import struct
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bootcache.errors import BootcacheError, ImageCorruptError, ImageFormatError, StaleBaseError
from bootcache.layers.uri import file_path, source_kind
from bootcache.publish import fetch
from bootcache.publish.artifact import (
    COMPRESSED,
    NOT_COPIED,
    Artifact,
    DataCluster,
    data_clusters,
    parse_head,
)
from bootcache.qcow2 import cache_ext, seqwrite
from bootcache.qcow2 import format as fmt
from bootcache.qcow2.compress import decompress_cluster
from bootcache.qcow2.digest_ext import FLAG_FRAME_CHECKSUMS, ContentHasher
from bootcache.sources.base import ByteSource

log = logging.getLogger("bootcache.publish")
_BATCH_BYTES = 1 << 20
_HASH_STEP = 1 << 20  # small: the hash trails the download closely


@dataclass
class PullResult:
    cache: str
    clusters: int
    artifact_bytes: int
    downloaded_bytes: int
    resumed_from: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "clusters": self.clusters,
                "artifact-bytes": self.artifact_bytes, "downloaded-bytes": self.downloaded_bytes,
                "resumed-from": self.resumed_from, "seconds": round(self.seconds, 3)}


async def pull(src: str, cache: str, *, base: str | None = None,
               threads: int | None = None) -> PullResult:
    """Pull the artifact ``src`` (path, http(s):// or s3:// URL) into the new cache ``cache``.

    ``base`` overrides the base the cache names (default: the artifact's).
    """
    kind = source_kind(src)
    # What the pull will run loads before the clock starts: imports are a fixed
    # start-up cost (about a second for aiohttp on a busy machine), reported
    # apart from the pull's own time by bench/publish_pull.py, and they would
    # otherwise stall the event loop while the download runs.
    _preload(kind)
    began = time.monotonic()
    cache = os.path.abspath(cache)
    cache_dir = os.path.dirname(cache)
    if os.path.lexists(cache):
        raise BootcacheError(f"{cache}: already exists; remove it first (a cache in use "
                             "is never replaced under its daemon)")
    if not os.path.isdir(cache_dir) or not os.access(cache_dir, os.W_OK | os.X_OK):
        raise BootcacheError(f"{cache}: cannot write into {cache_dir}")
    remote = kind in ("http", "s3")
    if kind not in ("file", "http", "s3"):
        raise BootcacheError(f"{src}: pull reads a path, an http(s):// or an s3:// URL")
    part_path = os.path.join(cache_dir, f".{os.path.basename(cache)}.pull")
    try:
        part_fd = os.open(part_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise BootcacheError(f"{part_path}: cannot create: {e.strerror}") from e
    source: ByteSource | None = None
    src_fd = -1
    try:
        try:
            fcntl.flock(part_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BootcacheError(f"{cache}: another pull into it is running") from None
        # No other pull runs: temporary images of killed ones can go.
        for stale in glob.glob(os.path.join(glob.escape(cache_dir),
                                            f".{glob.escape(os.path.basename(cache))}.*.tmp")):
            os.unlink(stale)
        if remote:
            from bootcache.layers.uri import open_source

            source = await open_source(src)
            size = await source.size()
            log.debug("%s: opened (%.3f s)", src, time.monotonic() - began)
            start = await fetch.head(source, size)
            log.debug("%s: header cluster (%.3f s)", src, time.monotonic() - began)
        else:
            try:
                src_fd = os.open(file_path(src), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise BootcacheError(f"{src}: cannot open: {e.strerror}") from e
            size = os.fstat(src_fd).st_size
            start = os.pread(src_fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
        art = parse_head(start, size, src)
        base_name = base or art.header.backing_file
        assert base_name is not None
        if remote:
            assert source is not None
            have = fetch.resume_point(part_fd, start, art.cs, size)
            resumed = have if have > len(start) else 0
            stream = fetch.ArtifactBytes(part_fd, size, have,
                                         digest=fetch.FileDigest(art.file_sha256_at))
            downloader = asyncio.create_task(fetch.download(source, stream))
        else:
            resumed = 0
            stream = fetch.ArtifactBytes(src_fd, size, size)
            downloader = None
        try:
            # The base's client (the NBD client: about 20 ms) loads on a worker
            # thread once the download has started, not before it (the link
            # would idle meanwhile): the event loop shares the interpreter with
            # it in 5 ms turns instead of stalling for the whole import.
            preloading = asyncio.create_task(asyncio.to_thread(_preload_base, base_name))
            # The base is checked while the artifact downloads and is written:
            # its latency is not added; nothing is linked before it passed.
            checking = asyncio.create_task(check_base(art, base_name, cache_dir, src,
                                                      after=preloading))
            building = asyncio.create_task(
                _build(art, stream, cache, base_name, threads or os.cpu_count() or 2, checking))
            clusters = await _first_failure(checking, building)
            if downloader is not None:
                await downloader
            log.debug("%s: pulled (%.3f s)", src, time.monotonic() - began)
        except BaseException as e:
            if remote and isinstance(e, ImageFormatError | ImageCorruptError | StaleBaseError):
                # A corrupt download is not resumed (start over); nor is one
                # that does not fit this node's base.
                os.unlink(part_path)
            if downloader is not None:
                downloader.cancel()
                with contextlib.suppress(BaseException):
                    await downloader
            raise
        os.unlink(part_path)
        return PullResult(cache, clusters, size, size - resumed if remote else 0, resumed,
                          time.monotonic() - began)
    finally:
        os.close(part_fd)
        if src_fd >= 0:
            os.close(src_fd)
        if os.path.exists(part_path) and os.path.getsize(part_path) == 0:  # nothing to resume
            os.unlink(part_path)
        if source is not None:
            await source.close()


def _preload(kind: str) -> None:
    for name in ("bootcache.layers.cache", "bootcache.layers.chain", "zstandard"):
        importlib.import_module(name)
    if kind in ("http", "s3"):
        importlib.import_module(f"bootcache.sources.{kind}")


def _preload_base(base_name: str) -> None:
    """The client of the base's source, loaded before the download starts (an
    import would stall it), while the check of the base runs beside it."""
    with contextlib.suppress(ValueError):  # a bad name is reported by the check
        kind = source_kind(base_name)
        importlib.import_module({"http": "bootcache.sources.http", "s3": "bootcache.sources.s3",
                                 "nbd": "bootcache.nbd.client"}.get(kind, "bootcache.sources.file"))


async def _first_failure(checking: asyncio.Task[None], building: asyncio.Task[int]) -> int:
    """The build's result; the base check's error as soon as it fails (the
    build is then stopped, not run to its end)."""
    try:
        await asyncio.wait({checking, building}, return_when=asyncio.FIRST_EXCEPTION)
        if checking.done() and checking.exception() is not None:
            building.cancel()
            with contextlib.suppress(BaseException):
                await building
            await checking  # raises
        return await building
    finally:
        for task in (checking, building):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def check_base(art: Artifact, base_name: str, cache_dir: str, src: str,
                     after: asyncio.Task[None] | None = None) -> None:
    """Refuse an artifact filled from another base than the one the cache will
    use (once ``after``, the loading of its client, is done)."""
    if after is not None:
        await after
    from bootcache.layers.cache import base_identity
    from bootcache.layers.chain import ChainPolicy, is_uri, open_layer

    name = base_name
    if not is_uri(name) and not os.path.isabs(name):
        name = os.path.join(cache_dir, name)
    layer = await open_layer(name, fmt=art.header.backing_format,
                             policy=ChainPolicy.from_env())
    try:
        current = await base_identity(layer)
    finally:
        await layer.close()
    recorded = art.identity
    if recorded != current:
        changed = sorted(k for k in set(recorded) | set(current)
                         if recorded.get(k) != current.get(k))
        raise StaleBaseError(
            f"{src}: published from another base than {base_name} (identity differs in "
            f"{', '.join(changed)}); refusing to pull")


def _cache_header(art: Artifact, base_name: str, clusters: int) -> fmt.Header:
    """The pulled cache's header: the artifact's facts, uncompressed, counters reset."""
    a = art.header
    used = clusters * art.cs
    if used > art.cache.quota:
        raise ImageFormatError(f"artifact holds {used} bytes of data, over its quota "
                               f"{art.cache.quota}")
    ext = art.cache
    fresh = cache_ext.CacheExtension(
        quota=ext.quota, policy=ext.policy, high_watermark=ext.high_watermark,
        low_watermark=ext.low_watermark, on_stale=ext.on_stale, used_bytes=used,
        identity=ext.identity, flags=ext.flags)
    h = fmt.Header(version=3, cluster_bits=a.cluster_bits, size=a.size, l1_size=0,
                   l1_table_offset=0, refcount_table_offset=0, refcount_table_clusters=0,
                   autoclear_features=fmt.AUTOCLEAR_CACHE, refcount_order=4,
                   header_length=fmt.OUR_V3_HEADER_LENGTH, backing_file=base_name)
    for e in a.extensions:
        if e.type == fmt.EXT_CACHE:
            h.extensions.append(fmt.Extension(e.type, fresh.encode()))
        elif e.type not in NOT_COPIED:
            h.extensions.append(fmt.Extension(e.type, e.data))
    h.extensions.append(fmt.Extension(fmt.EXT_FEATURE_TABLE,
                                      fmt.feature_table_extension(fmt.FEATURE_NAMES)))
    return h


async def _read_metadata(art: Artifact, stream: fetch.ArtifactBytes) -> list[DataCluster]:
    h = art.header
    l1 = await stream.read(h.l1_table_offset, h.l1_size * 8)
    tables: dict[int, bytes] = {}
    data_start = h.l1_table_offset + h.l1_size * 8
    offsets = {}
    for l1i in range(h.l1_size):
        entry = struct.unpack_from(">Q", l1, l1i * 8)[0]
        if entry & fmt.L1E_RESERVED_MASK:
            raise ImageFormatError(f"artifact: L1 entry {l1i} has reserved bits set")
        off = entry & fmt.L1E_OFFSET_MASK
        if off:
            if off % art.cs or off + art.cs > stream.size:
                raise ImageFormatError(f"artifact: L2 table at {off:#x} is misplaced")
            offsets[l1i] = off
            data_start = max(data_start, off + art.cs)
    for l1i, off in offsets.items():
        tables[l1i] = await stream.read(off, art.cs)
    return data_clusters(art, l1, tables, data_start)


def _expand(art: Artifact, batch: list[DataCluster], region: bytes, at: int
            ) -> list[bytes | memoryview]:
    """The guest content of a batch of data clusters, from the bytes they occupy."""
    cs = art.cs
    checksummed = _frame_checksums(art)
    out: list[bytes | memoryview] = []
    view = memoryview(region)
    for dc in batch:
        raw = view[dc.start - at:dc.end - at]
        if dc.kind == COMPRESSED:
            out.append(decompress_cluster(raw, cs, art.header.compression_type,
                                          checksummed=checksummed))
        else:
            out.append(raw)
    return out


def _frame_checksums(art: Artifact) -> bool:
    """Whether each compressed cluster verifies its own content (spec 14.2): then
    the file digest and those checksums cover everything, and the content is
    not hashed a second time."""
    return bool(art.digest.flags & FLAG_FRAME_CHECKSUMS)


async def _hash_file(art: Artifact, stream: fetch.ArtifactBytes) -> bytes:
    """file_sha256 of the artifact (its own 32 bytes read as zeros): hashed by
    the download as it lands, or read from a local artifact."""
    if stream.digest is not None:
        return await stream.file_digest()
    await stream.wait(stream.size)
    digest = fetch.FileDigest(art.file_sha256_at)
    for off in range(0, stream.size, _HASH_STEP):
        # On a worker thread: the event loop only waits.
        await asyncio.to_thread(digest.add_file, stream.fd, min(off + _HASH_STEP, stream.size))
    return digest.digest()


async def _build(art: Artifact, stream: fetch.ArtifactBytes, cache: str, base_name: str,
                 threads: int, base_checked: asyncio.Task[None]) -> int:
    """Write the cache image into a temporary file, verify, then link it into place
    (once ``base_checked`` has passed)."""
    hashing = asyncio.create_task(_hash_file(art, stream))
    fd = direct_fd = -1
    tmp = ""
    try:
        dcs = await _read_metadata(art, stream)
        header = _cache_header(art, base_name, len(dcs))
        cs = art.cs
        layout = seqwrite.plan(header, [d.guest for d in dcs], [cs] * len(dcs),
                               [False] * len(dcs))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache),
                                   prefix=f".{os.path.basename(cache)}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # as bootcache create makes images, not mkstemp's 0600
        direct_fd = seqwrite.open_direct(tmp)
        # Around the page cache where the file system allows (see open_direct);
        # synced as it goes either way, so writeback and the file system's
        # records of the new blocks overlap the download, not the end.
        writer = seqwrite.SequentialWriter(fd, layout, sync_every=16 << 20, direct_fd=direct_fd)
        writer.write_metadata(seqwrite.metadata(layout))
        log.debug("metadata read, %d data clusters; download at %d", len(dcs), stream.available)
        content = await _fill(art, stream, dcs, writer, threads)
        log.debug("data written; download at %d of %d", stream.available, stream.size)
        file_sha = await hashing
        if file_sha != art.digest.file_sha256:
            raise ImageFormatError(
                "the artifact does not match its digest (file_sha256): it is corrupt or was "
                "damaged in transfer; the downloaded copy is discarded")
        if content is not None and content != art.digest.content_sha256:
            raise ImageFormatError("the artifact's data does not match its digest "
                                   "(content_sha256); the downloaded copy is discarded")
        def finish() -> None:
            writer.finish()
            os.fsync(fd)

        await asyncio.to_thread(finish)
        log.debug("cache image durable")
        await base_checked
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, cache)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            raise BootcacheError(f"{cache}: appeared while pulling; left as it is") from None
        os.unlink(tmp)
        tmp = ""
        _fsync_dir(os.path.dirname(cache))
        return len(dcs)
    finally:
        hashing.cancel()
        with contextlib.suppress(BaseException):
            await hashing
        if fd >= 0:
            os.close(fd)
        if direct_fd >= 0:
            os.close(direct_fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


async def _fill(art: Artifact, stream: fetch.ArtifactBytes, dcs: list[DataCluster],
                writer: seqwrite.SequentialWriter, threads: int) -> bytes | None:
    """Decompress the data clusters on worker threads and write them in order;
    the content digest, unless the clusters verify themselves.

    Three stages overlap: reading batches as they arrive, decompressing them
    (``threads`` at once), and writing them (one at a time, in order, each
    batch's write chained to the one before), so a write never holds up the
    next decompression nor the download."""
    cs = art.cs
    per_batch = max(_BATCH_BYTES // cs, 1)
    hasher = None if _frame_checksums(art) else ContentHasher()

    def store(batch: list[DataCluster], expanded: list[bytes | memoryview]) -> None:
        for dc, data in zip(batch, expanded, strict=True):
            if hasher is not None:
                hasher.add(dc.guest * cs, data)
            writer.write_data(data)

    async def write_after(before: asyncio.Task[None] | None, batch: list[DataCluster],
                          expanded: Future[list[bytes | memoryview]]) -> None:
        data = await asyncio.wrap_future(expanded)
        if before is not None:
            await before
        await asyncio.to_thread(store, batch, data)

    writes: deque[asyncio.Task[None]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="unzstd") as pool:
        try:
            for first in range(0, len(dcs), per_batch):
                batch = dcs[first:first + per_batch]
                start, end = batch[0].start, max(d.end for d in batch)
                region = await stream.read(start, end - start)
                stream.release(start)  # batches come in file order
                expanded = pool.submit(_expand, art, batch, region, start)
                writes.append(asyncio.create_task(
                    write_after(writes[-1] if writes else None, batch, expanded)))
                while writes and (len(writes) > 4 * threads or writes[0].done()):
                    await writes.popleft()  # bounded memory; raises the first failure
            while writes:
                await writes.popleft()
        finally:
            for task in writes:
                task.cancel()
            for task in writes:
                with contextlib.suppress(BaseException):
                    await task
    return None if hasher is None else hasher.digest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
