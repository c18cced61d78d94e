"""A pass-through layer that records every read into a boot trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bootcache.block.graph import NodeRef
from bootcache.block.layer import BlockLayer, Extent


class TraceLayer(BlockLayer):
    """Forwards everything to the layer below; reports each read to ``record``
    (offset, length) before passing it on."""

    def __init__(self, below: NodeRef, record: Callable[[int, int], None]) -> None:
        self._below_ref = below
        self.below = below.layer
        self.record = record
        self.name = self.below.name

    @property
    def size(self) -> int:
        return self.below.size

    @property
    def read_only(self) -> bool:
        return self.below.read_only

    async def pread(self, offset: int, length: int) -> bytes:
        self.record(offset, length)
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

    def lower(self) -> list[BlockLayer]:
        return [self.below]

    async def close(self) -> None:
        await self._below_ref.release()
