"""An artifact's bytes as they arrive: from a local file at once, or downloaded.

A remote artifact (HTTP(S) or S3, through the ordinary byte sources, which
retry and pin the object's version with If-Match) is downloaded in order
into a partial file beside the destination. Readers wait for the bytes they
need while the rest is still coming. An interrupted download resumes from
the partial file's length when the object's header cluster is unchanged
(it holds the digest of the whole file, so an equal header means the same
artifact); whatever survived of a partial file is verified with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import deque

from bootcache.errors import BootcacheError, SourceError
from bootcache.sources.base import ByteSource

#: Download requests: small enough that the work on arrived bytes (decompressing,
#: writing) overlaps the transfer, enough in flight to fill a fast link.
log = logging.getLogger("bootcache.publish")
_CHUNK = 512 << 10
_CHUNKS_IN_FLIGHT = 2


#: Downloaded bytes kept in memory for the reader, at most (beyond, it reads the file).
_KEEP_MAX = 64 << 20


class FileDigest:
    """SHA-256 of an artifact's bytes, fed in order, its own 32-byte digest
    field (at ``zero_at``) read as zeros (spec section 13)."""

    def __init__(self, zero_at: int) -> None:
        self.zero_at = zero_at
        self.done = 0
        self._h = hashlib.sha256()

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the file (from offset ``done``)."""
        off, at = self.done, self.zero_at
        if off < at + 32 and at < off + len(data):
            patched = bytearray(data)
            lo, hi = max(at - off, 0), min(at + 32 - off, len(data))
            patched[lo:hi] = bytes(hi - lo)
            data = patched
        self._h.update(data)
        self.done += len(data)

    def add_file(self, fd: int, end: int) -> None:
        """Feed the file's bytes from ``done`` up to ``end`` (read from ``fd``)."""
        while self.done < end:
            chunk = os.pread(fd, min(1 << 20, end - self.done), self.done)
            if not chunk:
                raise BootcacheError("the partial download shrank while it was read")
            self.add(chunk)

    def digest(self) -> bytes:
        return self._h.digest()


class ArtifactBytes:
    """A local file whose first ``available`` bytes of ``size`` are there to read.

    A download also keeps the chunks it writes in memory until the reader
    has passed them (``release``), so the reader gets them without reading
    back what was just written; and it hashes them as they land (``digest``,
    when given), so the file is not read a second time for its digest.
    """

    def __init__(self, fd: int, size: int, available: int,
                 digest: FileDigest | None = None) -> None:
        self.fd = fd
        self.size = size
        self.available = available
        self.digest = digest
        self._kept: deque[tuple[int, bytes]] = deque()
        self._kept_bytes = 0
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._downloaded = asyncio.Event()

    async def wait(self, end: int) -> None:
        """Until bytes [0, end) are there (or the download failed)."""
        end = min(end, self.size)
        while self.available < end:
            if self._error is not None:
                raise self._error
            self._changed.clear()
            await self._changed.wait()
        if self.available < end and self._error is not None:
            raise self._error

    async def file_digest(self) -> bytes:
        """The digest of the whole download, once the download has ended (the
        bytes a resumed pull kept are hashed while the rest comes: that they
        are all readable says nothing of the digest)."""
        assert self.digest is not None
        while not self._downloaded.is_set():
            if self._error is not None:
                raise self._error
            await self._wait_change()
        return self.digest.digest()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def read(self, offset: int, length: int) -> bytes:
        await self.wait(offset + length)
        length = min(length, self.size - offset)
        data = self._from_memory(offset, length)
        if data is None:
            data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise BootcacheError("the downloaded artifact shrank while it was read")
        return data

    def _from_memory(self, offset: int, length: int) -> bytes | None:
        end, pos = offset + length, offset
        parts: list[memoryview] = []
        for start, chunk in self._kept:
            stop = start + len(chunk)
            if stop <= pos:
                continue
            if start > pos:
                break
            parts.append(memoryview(chunk)[pos - start:min(stop, end) - start])
            pos = min(stop, end)
            if pos >= end:
                break
        return b"".join(parts) if pos >= end and parts else None

    def release(self, before: int) -> None:
        """The reader needs nothing before ``before`` any more."""
        kept = self._kept
        while kept and kept[0][0] + len(kept[0][1]) <= before:
            self._kept_bytes -= len(kept.popleft()[1])

    def advance(self, available: int, chunk: bytes | None = None) -> None:
        """Bytes up to ``available`` are in the file; ``chunk`` ends there."""
        if chunk is not None and self._kept_bytes + len(chunk) <= _KEEP_MAX:
            self._kept.append((available - len(chunk), chunk))
            self._kept_bytes += len(chunk)
        self.available = available
        self._changed.set()

    def downloaded(self) -> None:
        """Every byte is in the file and, with ``digest``, hashed."""
        self._downloaded.set()
        self._changed.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._changed.set()


#: The first request: the header cluster and, in one round trip, most likely
#: the L1 and L2 tables behind it.
_HEAD = 1 << 20


async def head(source: ByteSource, size: int) -> bytes:
    """The start of a qcow2 artifact: at least its header cluster (whose size the
    header gives), read with as few requests as possible."""
    data = await source.pread(0, min(size, _HEAD))
    bits = int.from_bytes(data[20:24], "big") if len(data) >= 24 else 0
    if 9 <= bits <= 21 and len(data) < min(size, 1 << bits):
        data += await source.pread(len(data), min(size, 1 << bits) - len(data))
    return data  # not qcow2 when the bits are out of range: the header parser says so


def resume_point(fd: int, start: bytes, cluster: int, size: int) -> int:
    """How much of a partial download can be kept: all of it when it begins with
    the artifact's header cluster (``start[:cluster]``); else it starts over
    from ``start``, the artifact's first bytes, which the caller has already."""
    have = os.fstat(fd).st_size
    if have < cluster or have > size or os.pread(fd, cluster, 0) != start[:cluster]:
        os.ftruncate(fd, 0)
        have = 0
    if have < len(start):
        os.pwrite(fd, start, 0)  # the same bytes where they overlap: the same artifact
        return len(start)
    return have


async def download(source: ByteSource, into: ArtifactBytes) -> None:
    """Fetch the rest of the artifact into ``into``'s file, in order."""
    pending: deque[tuple[int, asyncio.Task[bytes]]] = deque()
    offset = into.available

    def ask() -> None:
        nonlocal offset
        while offset < into.size and len(pending) < _CHUNKS_IN_FLIGHT:
            n = min(_CHUNK, into.size - offset)
            pending.append((offset, asyncio.create_task(source.pread(offset, n))))
            offset += n

    digest, there = into.digest, offset
    try:
        ask()
        if digest is not None and digest.done < there:
            # What was there before (the head, a resumed part), while the rest comes.
            await asyncio.to_thread(digest.add_file, into.fd, there)
        while offset < into.size or pending:
            ask()
            at, task = pending.popleft()
            data = await task
            ask()  # the link stays busy while these bytes land
            # Off the event loop, which meanwhile receives the next chunks: a
            # write into fresh page-cache pages can take milliseconds.
            await asyncio.to_thread(_land, into.fd, digest, data, at)
            into.advance(at + len(data), data)
        into.downloaded()
        log.debug("%s: downloaded", source.name)
    except (SourceError, OSError, BootcacheError) as e:
        into.fail(e)
        raise
    finally:
        for _, task in pending:
            task.cancel()
        for _, task in pending:
            with contextlib.suppress(BaseException):
                await task


def _land(fd: int, digest: FileDigest | None, data: bytes, at: int) -> None:
    """Write a chunk into the partial file, and hash it (chunks land in order)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, memoryview(data)[done:], at + done)
    if digest is not None:
        digest.add(data)
