"""Decoded metadata tables and the bounded cache that holds them.

L2 tables and refcount blocks are loaded on demand and kept in one generic
LRU cache each (as QEMU does), so memory stays bounded whatever the image
size. A cache may depend on a :class:`SyncBarrier`: a table marked dirty
records the last write completed at that moment, and is written back (on
eviction or flush) only once the barrier made that write durable. No caller
can forget it: it is the only way a dirty table leaves the cache.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

from bootcache.qcow2.barrier import SyncBarrier

_LITTLE = sys.byteorder == "little"


def decode_u64(raw: bytes) -> array[int]:
    """Big-endian u64 table -> native array."""
    a = array("Q")
    a.frombytes(raw)
    if _LITTLE:
        a.byteswap()
    return a


def encode_u64(a: array[int]) -> bytes:
    """Native array -> big-endian u64 table."""
    if not _LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


class SparseTable:
    """A u64 table that is mostly zeros (the refcount table), keeping only its
    nonzero entries: a daemon holding a thousand small images would otherwise
    hold a whole cluster of zeros for each."""

    __slots__ = ("_entries", "_len")

    def __init__(self, values: Iterable[int]) -> None:
        self._entries: dict[int, int] = {}
        n = 0
        for i, v in enumerate(values):
            if v:
                self._entries[i] = int(v)
            n = i + 1
        self._len = n

    @classmethod
    def decode(cls, raw: bytes) -> SparseTable:
        """From a big-endian u64 table."""
        # Entries past the last nonzero byte are zero: decode only up to it.
        used = -(-len(raw.rstrip(b"\0")) // 8)
        table = cls(decode_u64(raw[:used * 8]))
        table._len = len(raw) // 8
        return table

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._entries.get(i, 0)

    def __setitem__(self, i: int, value: int) -> None:
        if not 0 <= i < self._len:
            raise IndexError(i)
        if value:
            self._entries[i] = value
        else:
            self._entries.pop(i, None)

    def __iter__(self) -> Iterator[int]:
        get = self._entries.get
        return (get(i, 0) for i in range(self._len))

    def items(self) -> list[tuple[int, int]]:
        """(index, value) of the nonzero entries, in index order."""
        return sorted(self._entries.items())

    def nonzero(self) -> list[int]:
        """The nonzero entries, in index order."""
        return [self._entries[i] for i in sorted(self._entries)]


_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


class RefBlock:
    """One refcount block: ``entries`` counters of ``bits`` bits each.

    Widths of 8 bits and more are big-endian integers; narrower ones are
    packed into bytes with entry 0 in the least significant bits.
    """

    __slots__ = ("_arr", "_raw", "bits", "entries", "mask")

    def __init__(self, raw: bytes, bits: int) -> None:
        self.bits = bits
        self.entries = len(raw) * 8 // bits
        self.mask = (1 << bits) - 1
        self._raw: bytearray | None = None
        self._arr: array[int] | None = None
        if bits >= 8:
            a = array(_TYPECODES[bits])
            a.frombytes(raw)
            if _LITTLE and bits > 8:
                a.byteswap()
            self._arr = a
        else:
            self._raw = bytearray(raw)

    def get(self, i: int) -> int:
        if self._arr is not None:
            return self._arr[i]
        assert self._raw is not None
        bit = i * self.bits
        return (self._raw[bit >> 3] >> (bit & 7)) & self.mask

    def set(self, i: int, value: int) -> None:
        if value < 0 or value > self.mask:
            raise OverflowError(f"refcount {value} does not fit in {self.bits} bits")
        if self._arr is not None:
            self._arr[i] = value
            return
        assert self._raw is not None
        bit = i * self.bits
        shift = bit & 7
        byte = self._raw[bit >> 3] & ~(self.mask << shift)
        self._raw[bit >> 3] = byte | (value << shift)

    def first_zero(self, start: int) -> int:
        """Index of the first zero entry at or after ``start`` (or ``entries``)."""
        if self._arr is not None:
            try:
                return self._arr.index(0, start)
            except ValueError:
                return self.entries
        for i in range(start, self.entries):
            if self.get(i) == 0:
                return i
        return self.entries

    def byte_span(self, first: int, last: int) -> tuple[int, bytes]:
        """(offset within block, on-disk bytes) covering entries first..last."""
        lo = first * self.bits // 8
        if self._arr is not None:
            part = array(self._arr.typecode, self._arr[first:last + 1])
            if _LITTLE and self.bits > 8:
                part.byteswap()
            return lo, part.tobytes()
        assert self._raw is not None
        hi = -(-(last + 1) * self.bits // 8)
        return lo, bytes(self._raw[lo:hi])

    def tobytes(self) -> bytes:
        if self._raw is not None:
            return bytes(self._raw)
        assert self._arr is not None
        if _LITTLE and self.bits > 8:
            b = array(self._arr.typecode, self._arr)
            b.byteswap()
            return b.tobytes()
        return self._arr.tobytes()


T = TypeVar("T")


class TableCache(Generic[T]):
    """A bounded LRU cache of decoded tables keyed by file offset.

    ``load(offset)`` reads and decodes a table; ``writeback(offset, table)``
    writes a dirty one, after ``depends_on`` made durable every write the
    table's changes may rely on.
    """

    def __init__(self, capacity: int, load: Callable[[int], Awaitable[T]],
                 writeback: Callable[[int, T], Awaitable[None]],
                 depends_on: SyncBarrier | None = None) -> None:
        self.capacity = max(capacity, 4)
        self._load = load
        self._writeback = writeback
        self._depends_on = depends_on
        self._tables: OrderedDict[int, T] = OrderedDict()
        #: Dirty tables: offset -> the barrier write number they rely on.
        self.dirty: dict[int, int] = {}

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def lookup(self, offset: int) -> T | None:
        """The table if cached (as recently used), else None; never loads."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    async def get(self, offset: int) -> T:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        table = await self._load(offset)
        # Another task may have loaded (and modified) it meanwhile: keep that one.
        existing = self._tables.get(offset)
        if existing is not None:
            return existing
        self._tables[offset] = table
        await self._shrink()
        return table

    async def put(self, offset: int, table: T, *, dirty: bool = True) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self._note_dirty(offset)
        await self._shrink()

    def mark_dirty(self, offset: int, table: T) -> None:
        """Record that ``table`` was modified.

        The caller's object wins: writers hold the image lock, so if the
        table was evicted and reloaded meanwhile, the reloaded copy lacks
        exactly the caller's changes.
        """
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        self._note_dirty(offset)

    def _note_dirty(self, offset: int) -> None:
        needed = self._depends_on.written if self._depends_on is not None else 0
        self.dirty[offset] = max(needed, self.dirty.get(offset, 0))

    def drop(self, offset: int) -> None:
        """Forget a table (its cluster was freed); a dirty copy is discarded."""
        self._tables.pop(offset, None)
        self.dirty.pop(offset, None)

    async def _write_back(self, offset: int) -> None:
        """Write one dirty table once what it relies on is durable."""
        while offset in self.dirty:
            needed = self.dirty[offset]
            if self._depends_on is not None:
                await self._depends_on.sync_to(needed)
            if self.dirty.get(offset) != needed:
                continue  # changed again while syncing: it may rely on more now
            del self.dirty[offset]  # a change during the write marks it dirty again
            try:
                await self._writeback(offset, self._tables[offset])
            except BaseException:
                self.dirty[offset] = max(needed, self.dirty.get(offset, 0))
                raise

    async def flush(self) -> None:
        """Write back every dirty table, in offset order."""
        while self.dirty:
            await self._write_back(min(self.dirty))

    async def _shrink(self) -> None:
        while len(self._tables) > self.capacity:
            victim = next((o for o in self._tables if o not in self.dirty), None)
            if victim is None:
                victim = next(iter(self._tables))
                await self._write_back(victim)
                if victim in self.dirty:
                    continue  # modified during the write-back: keep it
            self._tables.pop(victim, None)

    def clear(self) -> None:
        self._tables.clear()
        self.dirty.clear()

    def drop_clean(self) -> None:
        """Forget every table that matches the disk (they load again on use)."""
        for offset in [o for o in self._tables if o not in self.dirty]:
            del self._tables[offset]
