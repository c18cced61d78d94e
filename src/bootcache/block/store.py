"""What a cache layer needs of the image that keeps its copies: a cluster store.

The cache layer (layers/cache.py) decides *what* to keep (single flight,
quota, recency, what a changed base means); a :class:`CacheStore` keeps it:
which clusters are held, their bytes, storing and dropping clusters, and the
records the cache persists beside them. The qcow2 engine implements it
(qcow2/cache_store.py); nbdkit's cache filter splits its block store from
its policy the same way. It sits here, below both, so that neither imports
the other.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bootcache.block.graph import NodeRef
    from bootcache.block.layer import BlockLayer, Extent

#: A run of a looked-up range: (held, guest offset, length, where the store
#: keeps it). ``where`` means something only to the store (:meth:`CacheStore.read_run`).
Run = tuple[bool, int, int, Any]


class CacheStore(Protocol):
    """Whole clusters copied from a base, and the cache's records."""

    name: str

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster: the unit of lookups, stores and evictions."""

    @property
    def size(self) -> int:
        """The virtual disk's size (the base's, as the image records it)."""

    @property
    def closed(self) -> bool: ...

    # -- the base below ------------------------------------------------------------

    @property
    def base(self) -> BlockLayer:
        """The layer the copies come from."""

    def swap_base(self, ref: NodeRef) -> NodeRef | None:
        """Read from ``ref``'s layer from now on (a reopened base); returns the
        reference held before, which the caller releases."""

    async def read_below(self, offset: int, length: int) -> bytes:
        """Bytes of the base (zeros past its end)."""

    def read_below_nowait(self, offset: int, length: int) -> bytes | None:
        """:meth:`read_below` when the base reads it without waiting (a local
        file), else None."""

    # -- lookups and reads ---------------------------------------------------------

    def read_held_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes of a range held in host-contiguous clusters whose mapping
        is in memory, read without yielding; else None (no await, so nothing
        can release the clusters between lookup and read)."""

    def pinned(self) -> AbstractContextManager[None]:
        """While held, clusters a lookup returned stay readable: one unmapped
        meanwhile is not released for reuse until the pin ends."""

    async def lookup(self, offset: int, length: int) -> list[Run]:
        """[offset, offset+length) as runs held or missing (under :meth:`pinned`)."""

    def lookup_nowait(self, offset: int, length: int) -> list[Run] | None:
        """:meth:`lookup` with no await (None: it would have to wait)."""

    async def read_run(self, run: Run) -> bytes:
        """The bytes of a held run from :meth:`lookup` (under the same pin)."""

    def read_run_nowait(self, run: Run) -> bytes | None:
        """:meth:`read_run` with no await (None: it would have to wait); with
        no await since :meth:`lookup_nowait`, no pin is needed."""

    async def read(self, offset: int, length: int) -> bytes:
        """The disk's bytes: held clusters, the base elsewhere."""

    async def held_clusters(self) -> list[int]:
        """Every cluster held (what LRU order and used bytes start from)."""

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...

    # -- changing what is held -----------------------------------------------------

    async def store(self, first: int, data: bytes | memoryview) -> None:
        """Hold whole clusters from ``first`` (the last may end at the disk's
        end). OSError (ENOSPC) leaves nothing half held."""

    async def store_runs(self, runs: list[tuple[int, bytes | memoryview]]) -> None:
        """:meth:`store` of several runs ``(first, data)`` at once. OSError
        leaves some of them held (:meth:`lookup` tells which clusters)."""

    async def unmap(self, clusters: list[int]) -> None:
        """Stop holding clusters (their space is released at a later flush)."""

    async def unmap_all(self) -> int:
        """Stop holding anything; returns how many clusters were held."""

    async def drop_foreign_zeros(self) -> int:
        """Forget zero clusters (a cache never writes them: a foreign writer did,
        and they would hide the base); returns how many."""

    async def repair_leaks(self) -> tuple[int, int]:
        """Give back clusters a crash left allocated but unreferenced:
        (clusters reclaimed, corruptions found)."""

    # -- records -------------------------------------------------------------------

    def record(self, kind: int) -> bytes | None:
        """The record of a kind (a header extension type) the image keeps, if any."""

    def marked_consistent(self) -> bool:
        """Whether only writers that keep the cache's records wrote the image
        since they were last saved (a foreign writer clears the mark)."""

    async def save_records(self, records: dict[int, bytes], profile: Any = None) -> None:
        """Write records (and a boot profile, cut to the room left) with the
        consistency mark, in one header update."""

    def read_profile(self) -> Any:
        """The boot profile the image keeps, None if none (its type is the
        format's: qcow2/profile_ext.Profile); ImageFormatError if malformed."""

    def drop_clean_metadata(self) -> None:
        """Forget metadata read so far that the disk still has (idle caches)."""

    def identity(self) -> dict[str, Any]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
