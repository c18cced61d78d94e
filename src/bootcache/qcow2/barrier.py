"""The engine's one door for writes, and the sync barrier behind it.

Every byte the engine writes to an open image goes through
:class:`SyncBarrier`, which numbers the writes as they complete and knows
which of them a file sync has made durable. Whoever puts a pointer on disk
(an L2 table, an L1 entry, a refcount table entry, the header) asks the
barrier for the writes that pointer relies on first (:meth:`sync_to`); the
barrier syncs the file only when one of them is not durable yet. Because the
count covers every write, "relies on" needs no bookkeeping at the call site:
a structure modified after a write depends on it.
"""

from __future__ import annotations

from bootcache.sources.base import ByteSource


class SyncBarrier:
    """Counts completed writes and syncs the file up to a given one."""

    def __init__(self, source: ByteSource, file_size: int) -> None:
        self.source = source
        #: The end of the file as the engine made it (the one owner of that fact).
        self.file_size = file_size
        #: Number of the last write that completed.
        self.written = 0
        #: Every write up to this number is durable.
        self.durable = 0

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.source.pwrite(offset, data)
        finally:
            # Even a failed write may have reached the file in part: count it.
            self.written += 1
        self.file_size = max(self.file_size, offset + len(data))

    async def punch_hole(self, offset: int, length: int) -> None:
        try:
            await self.source.punch_hole(offset, length)
        finally:
            self.written += 1

    async def sync_to(self, needed: int) -> None:
        """Return once write number ``needed`` (and every one before) is durable."""
        if self.durable >= needed:
            return
        # Writes completing while the sync runs are not covered by it.
        target = self.written
        await self.source.flush()
        self.durable = max(self.durable, target)

    async def sync(self) -> None:
        """Make every write so far durable."""
        await self.sync_to(self.written)

    @property
    def clean(self) -> bool:
        """True when every write so far is durable."""
        return self.durable >= self.written
