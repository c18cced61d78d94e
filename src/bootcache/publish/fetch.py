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


class ArtifactBytes:
    """A local file whose first ``available`` bytes of ``size`` are there to read."""

    def __init__(self, fd: int, size: int, available: int) -> None:
        self.fd = fd
        self.size = size
        self.available = available
        self._changed = asyncio.Event()
        self._error: BaseException | None = None

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

    async def read(self, offset: int, length: int) -> bytes:
        await self.wait(offset + length)
        data = os.pread(self.fd, length, offset)
        if len(data) != min(length, self.size - offset):
            raise BootcacheError("the downloaded artifact shrank while it was read")
        return data

    def advance(self, available: int) -> None:
        self.available = available
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

    try:
        while offset < into.size or pending:
            ask()
            at, task = pending.popleft()
            data = await task
            ask()  # the link stays busy while these bytes land
            # Off the event loop, which meanwhile receives the next chunks: a
            # write into fresh page-cache pages can take milliseconds.
            await asyncio.to_thread(_write_all, into.fd, data, at)
            into.advance(at + len(data))
        log.debug("%s: downloaded", source.name)
    except (SourceError, OSError) as e:
        into.fail(e)
        raise
    finally:
        for _, task in pending:
            task.cancel()
        for _, task in pending:
            with contextlib.suppress(BaseException):
                await task


def _write_all(fd: int, data: bytes, at: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, memoryview(data)[done:], at + done)
