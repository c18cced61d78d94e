"""Fixtures for the NBD tests: a short socket directory and an in-process
server running on its own event loop thread."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nbd_testlib import short_tmpdir

from bootcache.block.layer import BlockLayer
from bootcache.nbd.server import NBDServer, close_layers


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


class InProcess:
    """An NBDServer on a background thread with a uvloop event loop."""

    def __init__(self, layers: dict[str, BlockLayer], path: str, **kw: Any) -> None:
        import uvloop

        self.path = path
        self.loop = uvloop.new_event_loop()
        self.server: NBDServer | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(layers, kw), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("in-process server did not start")
        if self._error:
            raise self._error

    def _run(self, layers: dict[str, BlockLayer], kw: dict[str, Any]) -> None:
        async def main() -> None:
            try:
                self.server = NBDServer(layers, **kw)
                await self.server.listen_unix(self.path)
                self._stop = asyncio.Event()
            except BaseException as e:
                self._error = e
                raise
            finally:
                self._ready.set()
            await self._stop.wait()
            await self.server.shutdown(timeout=10)
            await close_layers(list(layers.values()))

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(main())
        except BaseException:
            pass
        finally:
            self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (await it if it is a coroutine)."""
        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def inproc(sockdir: str) -> Iterator[Callable[..., InProcess]]:
    servers: list[InProcess] = []

    def start(layers: dict[str, BlockLayer], **kw: Any) -> InProcess:
        srv = InProcess(layers, f"{sockdir}/s{len(servers)}", **kw)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
