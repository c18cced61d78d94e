"""An asyncio lock that imports asyncio only when it is first taken.

A layer's lock guards its writes. ``bootcache info`` and ``check`` open an
image only to read it, with no event loop (see ``bootcache.block.sync``):
creating an ``asyncio.Lock`` up front would import asyncio, about a third
of such a command's start-up, for a lock nobody takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio


class LazyAsyncLock:
    """``async with lock:`` as with an ``asyncio.Lock``, made on first use."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None

    def locked(self) -> bool:
        return self._lock is not None and self._lock.locked()

    async def __aenter__(self) -> None:
        if self._lock is None:
            import asyncio

            self._lock = asyncio.Lock()
        await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._lock is not None
        self._lock.release()
