"""One read of clusters from a cache's base, shared by the read path (which
starts it and serves its bytes) and the storer (which stores them)."""

from __future__ import annotations

import asyncio


class Fetch:
    """One read of clusters [start, start + count) from the base.

    ``data`` holds the bytes once they arrived; it is registered in
    ``inflight`` until they are stored (or the store is given up), so a
    reader meanwhile takes them from here. Readers that come before the
    bytes wait for ``future`` (None: fetched without waiting, from a local
    base).
    """

    __slots__ = ("count", "data", "future", "generation", "start")

    def __init__(self, start: int, count: int, future: asyncio.Future[bytes] | None,
                 generation: int) -> None:
        self.start = start
        self.count = count
        self.future = future
        self.generation = generation
        self.data: bytes | None = None


def forget(inflight: dict[int, Fetch], fetch: Fetch) -> None:
    """Unregister a fetch's clusters (those that still point at it)."""
    for ci in range(fetch.start, fetch.start + fetch.count):
        if inflight.get(ci) is fetch:
            del inflight[ci]
