"""The node graph: every open image once, shared by reference.

QEMU's block layer keeps a graph of nodes, and two devices over the same
backing file share its node. bootcache does the same: a :class:`NodeGraph`
holds each open layer under its key (the canonical path of a file, or the
URI of a remote image) with a count of its users. A layer above holds a
:class:`NodeRef` to the layer below, reads through ``ref.layer`` and, when
it closes, releases the reference; it never closes what is below it. The
node closes when its last reference goes.

This is what lets one daemon export a cache image and, at the same time,
overlays whose backing file is that cache: the cache is opened (and its
write lock taken) once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bootcache.block.layer import BlockLayer
from bootcache.errors import BootcacheError

if TYPE_CHECKING:
    import asyncio


class NodeConflictError(BootcacheError):
    """An image is already open in a way that excludes the new use."""


@dataclass
class Node:
    """One open layer and who uses it."""

    key: str
    layer: BlockLayer
    #: Clients may write through it (an overlay or disk exported writable).
    writable: bool
    refs: int = 0


class NodeRef:
    """One user's hold on a node: read through ``layer``, ``release()`` once."""

    __slots__ = ("_graph", "_released", "node")

    def __init__(self, graph: NodeGraph | None, node: Node) -> None:
        self._graph = graph
        self.node = node
        self._released = False

    @property
    def layer(self) -> BlockLayer:
        return self.node.layer

    async def release(self) -> None:
        """Drop this hold; the node closes when it was the last."""
        if self._released:
            return
        self._released = True
        node = self.node
        node.refs -= 1
        if node.refs > 0:
            return
        if self._graph is not None:
            self._graph._forget(node)
        await node.layer.close()


def private_ref(layer: BlockLayer) -> NodeRef:
    """A reference to a layer nobody else shares: releasing it closes the layer."""
    return NodeRef(None, Node(key=layer.name, layer=layer, writable=False, refs=1))


class NodeGraph:
    """The open images of a process, each once, reference-counted."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._opening: dict[str, asyncio.Future[Node]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    async def acquire(self, key: str, open_layer: Callable[[], Awaitable[BlockLayer]], *,
                      writable: bool) -> NodeRef:
        """A reference to the node ``key``, opening it with ``open_layer`` if
        nobody holds it yet. Two users asking at once share one open."""
        # Imported here: a command that only reads one image never needs the
        # event loop, and asyncio is a third of its start-up.
        import asyncio

        while (pending := self._opening.get(key)) is not None:
            await asyncio.shield(pending)
        node = self._nodes.get(key)
        if node is None:
            fut: asyncio.Future[Node] = asyncio.get_running_loop().create_future()
            self._opening[key] = fut
            try:
                layer = await open_layer()
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # waiters look again (and open it themselves)
                raise
            finally:
                del self._opening[key]
            node = Node(key=key, layer=layer, writable=not layer.read_only)
            self._nodes[key] = node
            fut.set_result(node)
        else:
            self._check_sharing(node, writable)
        node.refs += 1
        return NodeRef(self, node)

    @staticmethod
    def _check_sharing(node: Node, writable: bool) -> None:
        if node.layer.self_writing:
            return  # a cache: clients never write it, however it was asked for
        if writable and not node.writable:
            raise NodeConflictError(
                f"{node.key}: already open read-only (as a backing file or a read-only "
                "export); remove those exports before exporting it writable")
        if not writable and node.writable:
            raise NodeConflictError(
                f"{node.key}: exported writable, so it cannot also be a backing file "
                "(its writes would change what the overlays above it read)")

    def _forget(self, node: Node) -> None:
        if self._nodes.get(node.key) is node:
            del self._nodes[node.key]


__all__ = ["Node", "NodeConflictError", "NodeGraph", "NodeRef", "private_ref"]
