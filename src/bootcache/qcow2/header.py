"""The one writer of the image header.

The header is the root every other structure hangs from, so it changes only
here, and only after everything it may point to is durable: each update
syncs the file, writes the changed bytes, and syncs again. The in-memory
:class:`~bootcache.qcow2.format.Header` it keeps is the one owner of the
facts the header records (table locations and sizes, disk size, features).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bootcache.qcow2 import format as fmt
from bootcache.qcow2.barrier import SyncBarrier
from bootcache.qcow2.format import Header

_OFF_SIZE = 24


class HeaderWriter:
    """Owns the parsed header and writes every change to it."""

    def __init__(self, header: Header, barrier: SyncBarrier) -> None:
        self.header = header
        self.barrier = barrier

    async def _write(self, offset: int, data: bytes) -> None:
        await self.barrier.sync()  # what the new value points to is durable first
        await self.barrier.pwrite(offset, data)
        await self.barrier.sync()

    async def set_incompatible(self, bits: int) -> None:
        self.header.incompatible_features = bits
        await self._write(fmt.OFF_INCOMPATIBLE, bits.to_bytes(8, "big"))

    async def set_autoclear(self, bits: int) -> None:
        self.header.autoclear_features = bits
        await self._write(fmt.OFF_AUTOCLEAR, bits.to_bytes(8, "big"))

    async def set_refcount_table(self, offset: int, clusters: int) -> None:
        h = self.header
        h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
        await self._write(fmt.OFF_REFCOUNT_TABLE,
                          offset.to_bytes(8, "big") + clusters.to_bytes(4, "big"))

    async def set_disk(self, size: int, l1_size: int, l1_offset: int) -> None:
        """Switch to a new virtual size and L1 table (one sync pair for both)."""
        h = self.header
        h.size, h.l1_size, h.l1_table_offset = size, l1_size, l1_offset
        # One write from the size to the L1 offset: the three change together.
        await self._write(_OFF_SIZE, size.to_bytes(8, "big") + h.crypt_method.to_bytes(4, "big")
                          + l1_size.to_bytes(4, "big") + l1_offset.to_bytes(8, "big"))

    async def rewrite(self) -> None:
        """Rewrite the whole header cluster (extensions, backing name) from memory."""
        await self._write(0, fmt.serialize_header(self.header))

    async def rewrite_with(self, extensions: Mapping[int, bytes | None], *,
                           autoclear_set: int = 0,
                           adjust: Callable[[Header], None] | None = None) -> None:
        """Replace header extensions (None removes one), set autoclear bits, let
        ``adjust`` fit what depends on the rest (a record sized to the room
        left), and rewrite the header cluster once."""
        h = self.header
        for ext_type, data in extensions.items():
            h.set_extension(ext_type, data)
        h.autoclear_features |= autoclear_set
        if adjust is not None:
            adjust(h)
        await self.rewrite()
