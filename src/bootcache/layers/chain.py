"""Opening an image and its backing chain under a policy.

A qcow2 image names its backing file as a path (relative to the image's own
folder) or a URI, exactly as QEMU reads it. Because the name comes from the
image, an untrusted image could point it at any host file; the policy
decides which names are followed: paths must resolve inside allowed
folders, URIs must use allowed schemes, loops and deep chains are refused.

Every image of a chain is a node of a :class:`NodeGraph`, keyed by its
canonical path or URI: opening a second chain through the same graph shares
the images the two have in common (a daemon exporting a cache and the
overlays above it opens the cache once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bootcache.block.graph import NodeGraph, NodeRef, private_ref
from bootcache.block.layer import BlockLayer
from bootcache.errors import (
    BackingPolicyError,
    BootcacheError,
    SourceError,
    UnsupportedFeatureError,
)
from bootcache.layers.raw import RawLayer
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE, MAGIC
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.base import ByteSource
from bootcache.sources.file import FileSource

if TYPE_CHECKING:
    from urllib.parse import SplitResult

REMOTE_SCHEMES = frozenset({"nbd", "nbd+unix", "nbd+tcp", "nbds", "nbds+unix", "http",
                            "https", "s3"})


@dataclass
class ChainPolicy:
    """Which backing files an image may name.

    ``allowed_dirs`` None means: the folder of the top image (and below).
    ``trusted`` follows any path, as QEMU does; use it only for images you made.
    """

    allowed_dirs: list[str] | None = None
    allowed_schemes: frozenset[str] = field(default_factory=lambda: REMOTE_SCHEMES)
    max_depth: int = 16
    trusted: bool = False
    #: Open cache images as caches (filling them on reads); else as plain qcow2.
    activate_caches: bool = True
    #: Bytes a cache fetches beyond each miss (rounded up to clusters).
    cache_readahead: int = 0
    #: Options of remote sources (timeout, deadline, retries, ...: RemoteOptions).
    remote_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> ChainPolicy:
        dirs = [d for d in os.environ.get("BOOTCACHE_BACKING_DIRS", "").split(":") if d]
        try:
            readahead = int(os.environ.get("BOOTCACHE_READAHEAD", "0"))
        except ValueError:
            readahead = 0
        return cls(allowed_dirs=dirs or None,
                   trusted=os.environ.get("BOOTCACHE_TRUST_BACKING") == "1",
                   cache_readahead=max(readahead, 0))


def _urlsplit(name: str) -> SplitResult:
    # urllib.parse takes a few ms to import: plain paths, what the CLI mostly
    # opens, never need it.
    from urllib.parse import urlsplit

    return urlsplit(name)


def is_uri(name: str) -> bool:
    # "C:" style or plain paths are not URIs
    return "://" in name and len(_urlsplit(name).scheme) > 1


async def open_source(name: str, *, writable: bool,
                      remote_options: dict[str, str] | None = None) -> ByteSource:
    """A byte source for a path or URI."""
    if is_uri(name) and not name.startswith("file://"):
        from bootcache.layers import uri  # remote kinds load their client libraries

        try:
            src: ByteSource = await uri.open_source(name, writable=writable,
                                                    **(remote_options or {}))
        except ValueError as e:
            # A malformed URI or option, often from an image's backing name: a
            # refusal like any other source's, not a programming error.
            text = str(e)
            raise SourceError(text if text.startswith(name) else f"{name}: {text}") from e
        return src
    path = _urlsplit(name).path if name.startswith("file://") else name
    return FileSource(path, writable=writable)


async def probe_format(source: ByteSource) -> str:
    head = await source.pread(0, 4)
    return "qcow2" if head == MAGIC else "raw"


def node_key(name: str) -> str:
    """The key of an image in a node graph: its URI, or its canonical path."""
    return name if is_uri(name) else os.path.realpath(name)


async def open_layer(name: str, *, writable: bool = False, fmt: str | None = None,
                     policy: ChainPolicy | None = None, keep_autoclear: int = 0,
                     follow_backing: bool = True) -> BlockLayer:
    """Open ``name`` (path or URI) and, for qcow2, its backing chain, on its
    own: closing the returned layer closes the whole chain."""
    ref = await open_node(name, NodeGraph(), writable=writable, fmt=fmt, policy=policy,
                          keep_autoclear=keep_autoclear, follow_backing=follow_backing)
    return ref.layer


async def open_node(name: str, graph: NodeGraph, *, writable: bool = False,
                    fmt: str | None = None, policy: ChainPolicy | None = None,
                    keep_autoclear: int = 0, follow_backing: bool = True) -> NodeRef:
    """A reference to ``name`` and its backing chain in ``graph``, opening
    only the images the graph does not hold yet."""
    policy = policy or ChainPolicy()
    top_dir = None if is_uri(name) else os.path.dirname(os.path.realpath(name))
    allowed = [os.path.realpath(d) for d in (policy.allowed_dirs or [])]
    if top_dir is not None and policy.allowed_dirs is None:
        allowed = [top_dir]
    opener = _Opener(graph, policy, allowed)
    return await opener.node(name, writable=writable, fmt=fmt, seen=[], follow=follow_backing,
                             keep_autoclear=keep_autoclear)


class _Opener:
    """Opens one chain under a policy, node by node, through a graph."""

    def __init__(self, graph: NodeGraph, policy: ChainPolicy, allowed: list[str]) -> None:
        self.graph = graph
        self.policy = policy
        self.allowed = allowed

    async def node(self, name: str, *, writable: bool, fmt: str | None, seen: list[str],
                   follow: bool, keep_autoclear: int = 0) -> NodeRef:
        key = node_key(name)
        if key in seen:
            raise BackingPolicyError(
                f"{name}: backing chain loops ({' -> '.join([*seen, key])})")
        if len(seen) > self.policy.max_depth:
            raise BackingPolicyError(f"{name}: backing chain deeper than "
                                     f"{self.policy.max_depth}")
        below = [*seen, key]
        if not follow:  # a partial chain is nobody else's business: not shared
            return private_ref(await self.layer(name, writable=writable, fmt=fmt, seen=below,
                                                follow=False, keep_autoclear=keep_autoclear))
        return await self.graph.acquire(
            key, lambda: self.layer(name, writable=writable, fmt=fmt, seen=below, follow=True,
                                    keep_autoclear=keep_autoclear),
            writable=writable)

    async def layer(self, name: str, *, writable: bool, fmt: str | None, seen: list[str],
                    follow: bool, keep_autoclear: int) -> BlockLayer:
        """Open ``name`` itself, and take references to its backing chain."""
        policy = self.policy
        source = await open_source(name, writable=writable,
                                   remote_options=policy.remote_options)
        try:
            fmt = fmt or await probe_format(source)
            if fmt == "raw":
                return await RawLayer.open(source, read_only=not writable)
            if fmt != "qcow2":
                raise UnsupportedFeatureError(f"{name}: unsupported format {fmt!r}")
            if writable and policy.activate_caches:
                keep_autoclear |= AUTOCLEAR_CACHE  # a cache stays a cache when opened as one
            img = await Qcow2Image.open(source, writable=writable,
                                        keep_autoclear=keep_autoclear, name=name)
            # The cache extension means nothing without a base (spec, section 2).
            is_cache = (img.header.find_extension(EXT_CACHE) is not None and follow
                        and policy.activate_caches and img.header.backing_file is not None)
            if is_cache and not writable:
                # A cache fills itself on reads, so it is always opened for writing
                # (clients still cannot write to it).
                await source.close()
                source = await open_source(name, writable=True)
                img = await Qcow2Image.open(source, writable=True,
                                            keep_autoclear=AUTOCLEAR_CACHE, name=name)
        except BaseException:
            await source.close()
            raise
        backing = img.header.backing_file

        async def open_backing(graph: NodeGraph | None = None) -> NodeRef:
            assert backing is not None
            target = resolve_backing(name, backing, policy, self.allowed)
            if graph is None:
                # Reopening a changed base: a fresh node, not the one in the graph.
                return await open_node(target, NodeGraph(), fmt=img.header.backing_format,
                                       policy=policy)
            return await self.node(target, writable=False, fmt=img.header.backing_format,
                                   seen=seen, follow=True)

        if backing and follow:
            try:
                img.attach_backing(await open_backing(self.graph))
            except BaseException:
                await img.close()
                raise
        if is_cache:
            # Imported here: the cache layer brings asyncio, which commands
            # that open no cache (info, check, create) do without.
            from bootcache.layers.cache import CacheLayer

            try:
                cache = await CacheLayer.open(img)
            except BaseException:
                await img.close()
                raise
            cache.reopen_base = open_backing
            cache.readahead = -(-policy.cache_readahead // img.cs)
            return cache
        return img


def resolve_backing(image: str, backing: str, policy: ChainPolicy, allowed: list[str]) -> str:
    """The path or URI a backing file name refers to, if the policy allows it."""
    if is_uri(backing) and not backing.startswith("file://"):
        scheme = _urlsplit(backing).scheme
        if scheme not in policy.allowed_schemes and not policy.trusted:
            raise BackingPolicyError(f"{image}: backing URI scheme {scheme!r} is not allowed")
        return backing
    path = _urlsplit(backing).path if backing.startswith("file://") else backing
    if not os.path.isabs(path):
        if is_uri(image):
            raise BackingPolicyError(
                f"{image}: relative backing file {backing!r} of a remote image")
        path = os.path.join(os.path.dirname(image), path)
    if policy.trusted:
        return path
    real = os.path.realpath(path)
    if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in allowed):
        raise BackingPolicyError(
            f"{image}: backing file {backing!r} resolves to {real}, outside the allowed "
            f"folders ({', '.join(allowed) or 'none'}); allow it with "
            "BOOTCACHE_BACKING_DIRS or --backing-dir")
    return path


__all__ = ["BootcacheError", "ChainPolicy", "node_key", "open_layer", "open_node",
           "resolve_backing"]
