"""A pass-through layer that records every read into a boot trace."""

from __future__ import annotations

from typing import Any

from bootcache.layers.base import BlockLayer, Extent
from bootcache.storm.trace import TraceWriter


class TraceLayer(BlockLayer):
    """Forwards everything to ``below``; writes each read to ``writer``."""

    def __init__(self, below: BlockLayer, writer: TraceWriter) -> None:
        self.below = below
        self.writer = writer
        self.name = below.name

    @property
    def size(self) -> int:
        return self.below.size

    @property
    def read_only(self) -> bool:
        return self.below.read_only

    async def pread(self, offset: int, length: int) -> bytes:
        self.writer.read(offset, length)
        return await self.below.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     *, fua: bool = False) -> None:
        await self.below.pwrite(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True,
                           fua: bool = False) -> None:
        await self.below.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua)

    async def discard(self, offset: int, length: int) -> None:
        await self.below.discard(offset, length)

    async def flush(self) -> None:
        await self.below.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.below.block_status(offset, length)

    async def prefetch(self, offset: int, length: int) -> None:
        await self.below.prefetch(offset, length)

    async def settle(self) -> None:
        await self.below.settle()

    def identity(self) -> dict[str, Any]:
        return self.below.identity()

    async def close(self) -> None:
        await self.below.close()
