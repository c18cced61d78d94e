"""The export registry: which names the node serves, and who is connected.

An export is a name bound to a node of the daemon's :class:`NodeGraph` (the
top of an image's chain). Exports come and go while the daemon runs: adding
one opens only what the graph does not hold yet; removing one drains it (no
new clients), then releases its reference, so the images close when no
other export uses them. The NBD server asks this registry, through the
:class:`~bootcache.nbd.server.Catalogue` interface, for the exports a client
may open; it never holds a list of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bootcache.block.graph import NodeGraph, NodeRef
from bootcache.errors import BackingPolicyError, BootcacheError
from bootcache.layers.chain import ChainPolicy, open_node
from bootcache.nbd.server import Export, NBDProtocol

log = logging.getLogger("bootcache.daemon")

ACTIVE, DRAINING = "active", "draining"
# Names go into nbd:// URIs and metric labels: keep them to URI-safe characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@:-]{0,254}")


class ExportError(BootcacheError):
    """A request about exports that cannot be done; nothing was changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status  # HTTP status for the control API


def default_name(image: str) -> str:
    """The export name of an image given without one: its file name, less .qcow2."""
    return os.path.basename(image).removesuffix(".qcow2")


@dataclass(eq=False)
class ExportEntry:
    """One named export."""

    name: str
    image: str
    read_only: bool
    ref: NodeRef
    export: Export
    state: str = ACTIVE
    connections: set[NBDProtocol] = field(default_factory=set)
    #: Set when the last client of a draining export leaves.
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, "node": self.ref.node.key,
                "read_only": self.export.info.read_only, "size": self.export.info.size,
                "state": self.state, "connections": len(self.connections)}


class ExportRegistry:
    """Names to exports, changed at runtime; the NBD server's catalogue."""

    def __init__(self, graph: NodeGraph, policy: ChainPolicy) -> None:
        self.graph = graph
        self.policy = policy
        self._entries: dict[str, ExportEntry] = {}
        #: Names being added right now (their open is in progress).
        self._adding: set[str] = set()
        #: Called with each export once it is added (the daemon's hooks).
        self.on_open: list[Callable[[ExportEntry], None]] = []

    # -- the catalogue interface -------------------------------------------------

    def get(self, name: str) -> Export | None:
        entry = self._entries.get(name)
        return entry.export if entry is not None and entry.state == ACTIVE else None

    def names(self) -> list[str]:
        return [n for n, e in self._entries.items() if e.state == ACTIVE]

    def attach(self, export: Export, conn: NBDProtocol) -> None:
        entry = self._entries.get(export.name)
        if entry is not None and entry.export is export:
            entry.connections.add(conn)

    def detach(self, export: Export, conn: NBDProtocol) -> None:
        entry = self._entries.get(export.name)
        if entry is None or entry.export is not export:
            return
        entry.connections.discard(conn)
        if not entry.connections:
            entry.drained.set()
            if entry.state == DRAINING:
                # The last client of an export being removed left: finish it.
                asyncio.get_running_loop().create_task(self._release(entry))

    # -- changes -------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[ExportEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ExportEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ExportError(f"no export named {name!r}", 404)
        return entry

    def check_new(self, image: str, name: str | None) -> str:
        """Validate an add before any I/O; returns the export name."""
        if not image:
            raise ExportError("no image given")
        name = name or default_name(image)
        if not _NAME.fullmatch(name):
            raise ExportError(f"export name {name!r}: use letters, digits and ._+@:- "
                              "(at most 255, not starting with a symbol)")
        if name in self._entries or name in self._adding:
            raise ExportError(f"export name {name!r} is already in use", 409)
        allowed = self.policy.allowed_dirs
        if allowed is not None and not self.policy.trusted and "://" not in image:
            real = os.path.realpath(image)
            dirs = [os.path.realpath(d) for d in allowed]
            if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in dirs):
                raise ExportError(f"{image}: outside the allowed image folders "
                                  f"({', '.join(dirs)})", 403)
        return name

    async def add(self, image: str, name: str | None = None, *,
                  read_only: bool = False) -> ExportEntry:
        """Open ``image`` (sharing what is open already) and export it as ``name``."""
        name = self.check_new(image, name)
        self._adding.add(name)
        try:
            try:
                ref = await open_node(image, self.graph, writable=not read_only,
                                      policy=self.policy)
            except BackingPolicyError as e:
                raise ExportError(str(e), 403) from e
            except BootcacheError as e:
                raise ExportError(str(e), 422) from e
            entry = ExportEntry(name=name, image=image, read_only=read_only, ref=ref,
                                export=Export(name, ref.layer, read_only=read_only))
            self._entries[name] = entry
        finally:
            self._adding.discard(name)
        for hook in self.on_open:
            hook(entry)
        log.info("export %s: %s%s", name, image, " (read-only)" if read_only else "")
        return entry

    async def remove(self, name: str, *, force: bool = False) -> None:
        """Stop exporting ``name``. Refused while clients are connected, unless
        ``force``: then the export is flushed and its clients disconnected."""
        entry = self.entry(name)
        if entry.connections and not force:
            raise ExportError(f"export {name!r} has {len(entry.connections)} connected "
                              "client(s); disconnect them or use --force", 409)
        entry.state = DRAINING  # no new clients from now on
        if entry.connections:
            try:
                await entry.ref.layer.settle()
                await entry.ref.layer.flush()
            except Exception as e:
                log.warning("export %s: flush before disconnecting failed: %s", name, e)
            for conn in list(entry.connections):
                conn.close_now()
            await entry.drained.wait()
        await self._release(entry)

    def drain(self, name: str) -> None:
        """Remove ``name`` once its last client leaves (no new ones meanwhile)."""
        entry = self.entry(name)
        entry.state = DRAINING
        if not entry.connections:
            asyncio.get_running_loop().create_task(self._release(entry))

    async def _release(self, entry: ExportEntry) -> None:
        if self._entries.get(entry.name) is not entry:
            return  # released already
        del self._entries[entry.name]
        try:
            await entry.ref.layer.settle()
            await entry.ref.release()
        except Exception:
            log.exception("export %s: closing failed", entry.name)
        log.info("export %s removed", entry.name)

    async def close(self) -> None:
        """Release every export (after the server stopped): images close."""
        for entry in list(self._entries.values()):
            await self._release(entry)


__all__ = ["ExportEntry", "ExportError", "ExportRegistry", "default_name"]
