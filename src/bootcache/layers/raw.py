"""Raw layer: a byte source presented as a virtual disk, byte for byte."""

from __future__ import annotations

from bootcache.block.layer import NOWAIT_MAX, BlockLayer, Extent, SourceBacked
from bootcache.errors import ReadOnlyError
from bootcache.sources.base import ByteSource
from bootcache.sources.version import BaseVersion


class RawLayer(SourceBacked, BlockLayer):
    """The disk is the source's bytes; its size is fixed when opened."""

    def __init__(self, source: ByteSource, size: int, *, read_only: bool = True) -> None:
        self.source = source
        self.name = source.name
        self._size = size
        self._read_only = read_only or not source.writable
        # A synchronous read, when the source is a local file.
        self._pread_now = getattr(source, "pread_now", None)
        # Subscribed now, before any layer above: it takes the new size first.
        self._unsubscribe = source.version.subscribe(self)

    @classmethod
    async def open(cls, source: ByteSource, *, read_only: bool = True) -> RawLayer:
        return cls(source, await source.size(), read_only=read_only)

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.source.pread(offset, length)

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        if (self._pread_now is None or offset < 0 or length > NOWAIT_MAX
                or offset + length > self._size):
            return None
        data: bytes = self._pread_now(offset, length)
        return data

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     *, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.name}: read-only")
        await self.source.pwrite(offset, data)
        if fua:
            await self.source.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True,
                           fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.name}: read-only")
        if not (may_unmap and await self.source.punch_hole(offset, length)):
            step = 1 << 20
            for off in range(offset, offset + length, step):
                await self.source.pwrite(off, bytes(min(step, offset + length - off)))
        if fua:
            await self.source.flush()

    async def discard(self, offset: int, length: int) -> None:
        if self._read_only:
            raise ReadOnlyError(f"{self.name}: read-only")
        await self.source.punch_hole(offset, length)

    async def flush(self) -> None:
        await self.source.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, data=True, zero=False)]

    async def base_stale(self, version: BaseVersion) -> None:
        pass

    async def base_adopted(self, version: BaseVersion) -> None:
        self._size = await self.source.size()  # a replaced object may have another size

    async def close(self) -> None:
        self._unsubscribe()
        await self.source.stop_watching()
        await self.source.close()
