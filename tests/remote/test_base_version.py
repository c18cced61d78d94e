"""The base-version watcher (sources/version.py) against real servers.

One replaced object is one event, however many detectors see it at once
(background version checks, reads meeting the new ETag), and every layer
over the source hears it: two caches over one base node reset once each
from a single detection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bootcache.block.graph import NodeGraph
from bootcache.errors import StaleBaseError
from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_node
from bootcache.layers.uri import open_source
from bootcache.sources.version import BaseVersion

from .conftest import Remote
from .test_remote_cache import SIZE, create_cache
from .test_remote_stale import version


class Recorder:
    """A listener that notes each step it hears, with the version then."""

    def __init__(self, name: str, heard: list[tuple[str, str, int]]) -> None:
        self.name = name
        self.heard = heard

    async def base_stale(self, version: BaseVersion) -> None:
        self.heard.append((self.name, "stale", version.current))
        await asyncio.sleep(0)  # let the other detectors pile up meanwhile

    async def base_adopted(self, version: BaseVersion) -> None:
        self.heard.append((self.name, "adopted", version.current))


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
def test_concurrent_detections_are_one_event(remote: Remote) -> None:
    contents = [version(41), version(42), version(43)]
    uri = remote.publish("disk.raw", contents[0])

    async def read_reporting(source: object, watch: BaseVersion) -> bytes:
        observed = watch.current
        try:
            return await source.pread(0, 4096)  # type: ignore[attr-defined, no-any-return]
        except StaleBaseError:  # the new ETag met in the middle of a read
            await watch.changed(observed)
            return await source.pread(0, 4096)  # type: ignore[attr-defined, no-any-return]

    async def go() -> None:
        source = await open_source(uri)
        try:
            watch = source.version
            assert watch is source.version, "one watcher per source"
            heard: list[tuple[str, str, int]] = []
            watch.subscribe(Recorder("first", heard))
            watch.subscribe(Recorder("second", heard))
            for n in (1, 2):
                remote.replace("disk.raw", contents[n])
                got = await asyncio.gather(*(watch.check() for _ in range(4)),
                                           *(read_reporting(source, watch) for _ in range(4)))
                # Each read returned the new version whole (after the event).
                assert all(g == contents[n][:4096] for g in got[4:])
                assert watch.current == n
                # Exactly one event per replacement, in subscription order.
                assert heard == [("first", "stale", n - 1), ("second", "stale", n - 1),
                                 ("first", "adopted", n), ("second", "adopted", n)], heard
                heard.clear()
            await watch.check()  # nothing changed: no event
            assert heard == [] and watch.current == 2
        finally:
            await source.stop_watching()
            await source.close()

    asyncio.run(go())


@pytest.mark.parametrize("remote", ["nginx", "s3"], indirect=True)
def test_caches_over_one_base_share_its_watcher(remote: Remote, tmp_path: Path) -> None:
    old, new = version(51), version(52)
    uri = remote.publish("disk.raw", old)
    paths = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for p in paths:
        create_cache(p, uri, "raw")

    async def go() -> None:
        graph = NodeGraph()
        refs = [await open_node(str(p), graph) for p in paths]
        a, b = (ref.layer for ref in refs)
        try:
            assert isinstance(a, CacheLayer) and isinstance(b, CacheLayer)
            assert a.base is b.base, "the base is one node of the graph"
            watch = a.base_version
            assert watch is not None and watch is b.base_version
            for layer in (a, b):
                assert await layer.pread(0, SIZE) == old
                await layer.settle()
            remote.replace("disk.raw", new)
            await watch.check()  # one detection, by way of cache a's base
            # Both caches dropped their copies of the old version, once each,
            # before either read again.
            assert a.stats()["resets"] == 1 and b.stats()["resets"] == 1
            assert a.stats()["cached_clusters"] == b.stats()["cached_clusters"] == 0
            for layer in (b, a):
                assert await layer.pread(0, SIZE) == new
                await layer.settle()
            assert a.stats()["resets"] == 1 and b.stats()["resets"] == 1
        finally:
            for ref in refs:
                await ref.release()

    asyncio.run(go())
