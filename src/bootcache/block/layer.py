"""The block-layer interface shared by every layer of an export.

Each layer (raw, qcow2, cache, ...) presents a virtual disk with the same
small async interface, in the spirit of nbdkit filters: a layer knows only
the layer directly below it, and overrides only the calls it changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bootcache.errors import ReadOnlyError
from bootcache.sources.base import ByteSource

if TYPE_CHECKING:
    from bootcache.sources.version import BaseVersion

#: The largest read :meth:`BlockLayer.pread_nowait` serves: a local read of
#: this size takes a fraction of a millisecond; larger ones would stall the loop.
NOWAIT_MAX = 2 << 20


@dataclass(frozen=True, slots=True)
class Extent:
    """One run of a virtual disk with uniform allocation state.

    ``data`` False means a hole (reads come from below or as zeros);
    ``zero`` True means the range is known to read as zeros.
    ``depth`` is the layer depth that provides the data (1 = this layer,
    2 = the layer below, ..., 0 = unallocated in the whole chain).
    """

    offset: int
    length: int
    data: bool
    zero: bool
    depth: int = 1


class BlockLayer(ABC):
    """A virtual disk: the one interface between layers."""

    #: Human-readable name used in messages and logs.
    name: str = ""
    #: Written only by its own copy-on-read path (a cache), never by clients,
    #: so any number of users may share it whatever access they asked for.
    self_writing: bool = False
    #: Serves its source's new content once the source adopted it (raw);
    #: False when it keeps what it parsed of the old one (qcow2 metadata), so
    #: whoever reads it must open it again after a change.
    follows_new_versions: bool = True

    @property
    @abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @property
    def read_only(self) -> bool:
        """True when writes, zeroing and discards are refused."""
        return True

    @abstractmethod
    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (the range must lie inside the disk)."""

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes of a read that completes now without waiting for anything
        but a local read (a cache hit in the page cache), else None: then the
        caller awaits :meth:`pread`, which also reports errors. Lets a server
        answer such reads without an asyncio Task; layers override it where
        they have such a path. Default: None."""
        return None

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durable before returning."""
        raise ReadOnlyError(f"{self.name}: read-only")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True,
                           fua: bool = False) -> None:
        """Make a range read as zeros; ``may_unmap`` allows releasing storage."""
        raise ReadOnlyError(f"{self.name}: read-only")

    async def discard(self, offset: int, length: int) -> None:
        """Hint that a range is unused; its content afterwards is unspecified
        by the NBD protocol, but every bootcache layer makes it read as zeros
        or leaves it unchanged."""
        raise ReadOnlyError(f"{self.name}: read-only")

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe allocation from ``offset``; returns at least one extent,
        covering a prefix of (or the whole) requested range."""
        return [Extent(offset, length, data=True, zero=False)]

    def identity(self) -> dict[str, Any]:
        """Cheap facts identifying the content version of this layer's storage."""
        return {}

    async def settle(self) -> None:
        """Wait for background work started by earlier calls (cache stores)."""

    def source_version(self) -> BaseVersion | None:
        """The watcher of the content version of the source this layer's bytes
        come from (sources/version.py), None for a layer that has none."""
        return None

    def lower(self) -> list[BlockLayer]:
        """The layers this one reads from (its backing file, the base of a cache)."""
        return []

    def content_version(self) -> int | None:
        """A number that moves whenever the bytes this layer serves switch to
        another version of its base (a cache reset); None for a layer whose
        content never switches under its readers."""
        return None

    def metrics(self) -> dict[str, Any]:
        """This layer's own counters, for ``ctl stats`` and Prometheus."""
        return {}

    async def prefetch(self, offset: int, length: int) -> None:
        """Bring a range into the nearest cache (NBD_CMD_CACHE); default: nothing."""

    async def close(self) -> None:
        """Release what this layer holds: its own storage, and its references
        to the layers below (which close when nobody else holds them)."""

    def check_range(self, offset: int, length: int) -> None:
        """Raise ValueError unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.name}: range {offset}+{length} outside disk of size {self.size}")


class SourceBacked:
    """For layers stored in one byte source: its identity is theirs."""

    source: ByteSource

    def identity(self) -> dict[str, Any]:
        return self.source.identity()

    def source_version(self) -> BaseVersion:
        return self.source.version

    def metrics(self) -> dict[str, Any]:
        stats = getattr(self.source, "stats", None)  # remote sources count requests
        return {"source": {"name": self.source.name, **stats()}} if callable(stats) else {}


def chain_of(layer: BlockLayer) -> list[BlockLayer]:
    """``layer`` and every layer it reads from, top first."""
    out, todo = [], [layer]
    while todo:
        node = todo.pop()
        if node not in out:
            out.append(node)
            todo.extend(reversed(node.lower()))
    return out
