"""The byte-source interface: where the bytes of an image file come from.

A byte source is a flat array of bytes (a local file, an NBD export, an HTTP
object, an S3 object). Image formats (raw, qcow2) are parsed on top of a
source; the qcow2 engine reads and writes its file only through this
interface, so a qcow2 base can live on any source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootcache.sources.version import BaseVersion


class ByteSource(ABC):
    """A flat, possibly remote, array of bytes."""

    #: Human-readable name (path or URI) used in messages.
    name: str = ""
    #: True when pwrite/truncate/punch_hole are allowed.
    writable: bool = False

    @abstractmethod
    async def size(self) -> int:
        """Current length in bytes."""

    @abstractmethod
    async def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; reads past the end return zeros."""

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``, extending the source if needed."""
        raise NotImplementedError(f"{self.name}: source is read-only")

    async def flush(self) -> None:
        """Make every completed write durable."""

    async def truncate(self, length: int) -> None:
        """Set the length of the source."""
        raise NotImplementedError(f"{self.name}: source cannot be truncated")

    async def punch_hole(self, offset: int, length: int) -> bool:
        """Release storage for a range, which then reads as zeros.

        Returns False when the source cannot do it (the data is unchanged).
        """
        return False

    def identity(self) -> dict[str, Any]:
        """Facts that identify this source's content version (size, ETag...)."""
        return {}

    #: Seconds between checks that the content is still the same version while
    #: nothing is read from it (None: the source cannot check cheaply).
    version_check_interval: float | None = None

    async def version_changed(self) -> bool:
        """Ask the source whether its content changed since it was opened."""
        return False

    async def refresh_identity(self) -> dict[str, Any]:
        """Adopt the content's current version after it changed; returns its identity."""
        return self.identity()

    def fingerprint(self) -> object:
        """A cheap value that changes whenever :meth:`identity` does."""
        return tuple(sorted((k, repr(v)) for k, v in self.identity().items()))

    _version: BaseVersion | None = None

    @property
    def version(self) -> BaseVersion:
        """The one watcher of this source's content version (sources/version.py),
        shared by every layer reading it; made on first use."""
        if self._version is None:
            from bootcache.sources.version import BaseVersion

            self._version = BaseVersion(self)
        return self._version

    async def stop_watching(self) -> None:
        """Stop the version watcher's background work, if it has one (closing)."""
        if self._version is not None:
            await self._version.close()

    async def close(self) -> None:
        """Release the source; further calls are errors."""
