"""The synchronous Python API for scripts and tests.

    import bootcache
    with bootcache.open("vm.qcow2", writable=True) as img:
        img.write(0, b"hello")
        assert img.read(0, 5) == b"hello"

Each image object runs the async layers on a private event loop, so it can
be used from plain synchronous code (not from inside a running loop: use
``bootcache.layers.chain.open_layer`` there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from bootcache.block.layer import BlockLayer, Extent
from bootcache.errors import BootcacheError
from bootcache.layers.chain import ChainPolicy, open_layer
from bootcache.qcow2.create import CreateOptions, create_qcow2, create_raw

T = TypeVar("T")


class Image:
    """An open image (or chain): ``size``, ``read``, ``write``, ``flush``, ``close``."""

    def __init__(self, layer: BlockLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self._loop = loop

    @property
    def size(self) -> int:
        return self.layer.size

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()  # never started: no "never awaited" warning
            raise BootcacheError(f"{self.layer.name}: the image is closed")
        return self._loop.run_until_complete(coro)

    def read(self, offset: int, length: int) -> bytes:
        return self._run(self._read(offset, length))

    async def _read(self, offset: int, length: int) -> bytes:
        data = await self.layer.pread(offset, length)
        # Between calls nothing runs the event loop: finish what the read
        # started (a cache storing what it fetched) before returning.
        await self.layer.settle()
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._run(self.layer.pwrite(offset, data))

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True) -> None:
        self._run(self.layer.write_zeroes(offset, length, may_unmap=may_unmap))

    def discard(self, offset: int, length: int) -> None:
        self._run(self.layer.discard(offset, length))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._run(self.layer.block_status(offset, length))

    def flush(self) -> None:
        self._run(self.layer.flush())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self.layer.close())
        finally:
            self._loop.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open(path: str, *, writable: bool = False, fmt: str | None = None,
         policy: ChainPolicy | None = None) -> Image:
    """Open an image (qcow2 or raw, probed unless ``fmt`` says) and its backing chain."""
    loop = asyncio.new_event_loop()
    try:
        layer = loop.run_until_complete(
            open_layer(path, writable=writable, fmt=fmt, policy=policy or ChainPolicy.from_env()))
    except BaseException:
        loop.close()
        raise
    return Image(layer, loop)


def create(path: str, size: int, *, fmt: str = "qcow2", cluster_size: int = 65536,
           compat: str = "1.1", refcount_bits: int = 16, lazy_refcounts: bool = False,
           backing_file: str | None = None, backing_fmt: str | None = None,
           compression_type: str = "zlib") -> None:
    """Create an empty image, as ``bootcache create`` does."""
    if fmt == "raw":
        create_raw(path, size)
        return
    create_qcow2(path, size, CreateOptions(
        cluster_size=cluster_size, compat=compat, refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts, backing_file=backing_file, backing_fmt=backing_fmt,
        compression_type=compression_type))
