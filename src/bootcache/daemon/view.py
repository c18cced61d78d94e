"""What the daemon's endpoints (control API, metrics) may ask of the daemon.

A protocol of its own, so that the endpoints depend on this small surface
and not on the daemon that starts them.
"""

from __future__ import annotations

from typing import Any, Protocol

from bootcache.daemon.exports import ExportEntry, ExportRegistry


class NodeView(Protocol):
    """A running node's exports and counters."""

    exports: ExportRegistry

    def export_stats(self, entry: ExportEntry) -> dict[str, Any]:
        """One export's counters, and those of the caches in its chain."""

    def node_stats(self, image: str) -> dict[str, Any] | None:
        """The counters of one open image (None: not open here)."""

    def node_metrics(self) -> list[tuple[str, dict[str, Any]]]:
        """Each open image's counters, by node key."""

    async def reload(self) -> dict[str, Any]:
        """Reread the configuration file and apply the catalog's difference."""

    async def publish(self, image: str, dest: str, *, level: int | None = None
                      ) -> dict[str, Any]:
        """Publish a cache this daemon serves (``bootcache cache publish``)."""
