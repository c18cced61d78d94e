"""Which of the node's open caches prefetch their boot profile.

The node configuration's ``prefetch`` switch, applied to every cache the
daemon opens and, when a reload changes it, to the caches already being
served: turned on, each open cache starts fetching what its profile names
and it does not hold (a prefetch resumes from the cache's contents, so
nothing is fetched twice); turned off, running prefetches stop (requests on
the wire finish and are stored).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bootcache.block.layer import BlockLayer, chain_of
from bootcache.layers.cache import CacheLayer
from bootcache.layers.prefetch import Prefetcher

log = logging.getLogger("bootcache.daemon")


def caches_in(layers: Iterable[BlockLayer]) -> list[CacheLayer]:
    return [layer for layer in layers if isinstance(layer, CacheLayer)]


class PrefetchSwitch:
    """The prefetchers of one daemon's caches, on or off together."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: Running (or finished) prefetchers, by the identity of their cache.
        self._by_cache: dict[int, Prefetcher] = {}

    def opened(self, top: BlockLayer) -> None:
        """A chain was opened for an export: its caches prefetch if the switch is on."""
        if self.enabled:
            for cache in caches_in(chain_of(top)):
                self._start(cache)

    async def set(self, enabled: bool, open_layers: Iterable[BlockLayer]) -> dict[str, int]:
        """Turn prefetch on or off for ``open_layers``'s caches and later ones."""
        if enabled == self.enabled:
            return {}
        self.enabled = enabled
        if enabled:
            started = sum(self._start(c) for c in caches_in(open_layers))
            log.warning("prefetch turned on: %d cache(s) prefetch", started)
            return {"started": started}
        running = [p for p in self._by_cache.values() if p.running]
        for p in running:
            await p.stop()
        self._by_cache.clear()
        log.warning("prefetch turned off: %d prefetch(es) stopped", len(running))
        return {"stopped": len(running)}

    def _start(self, cache: CacheLayer) -> bool:
        """Start a prefetcher for ``cache`` unless one runs; whether one started."""
        current = self._by_cache.get(id(cache))
        if current is not None and current.cache is cache and current.running:
            return False
        self._by_cache[id(cache)] = Prefetcher(cache).start()

        async def forget() -> None:
            if self._by_cache.get(id(cache)) is not None \
                    and self._by_cache[id(cache)].cache is cache:
                del self._by_cache[id(cache)]

        cache.on_close.append(forget)
        return True


__all__ = ["PrefetchSwitch", "caches_in"]
