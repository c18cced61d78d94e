"""CPU per cold miss: where a cache spends its own time on a fetched cluster.

A boot trace is replayed as fast as possible through a fresh cache image
(``CacheLayer`` directly, no NBD server) whose raw base is a local file or
an nginx on localhost. The event loop's thread CPU time (``time.thread_time``)
is counted per phase by wrapping the awaitables the cache layer calls on
its cache store (the product itself is not instrumented):

- fetch: ``CacheStore.read_below`` and ``read_below_nowait`` (the base
  source's read, HTTP client included)
- store: ``CacheStore.store`` and ``store_runs`` (data writes plus the
  L2/refcount updates they make)
- metadata: ``flush``, ``save_records``, ``unmap`` (write-back, fsync calls)
- bookkeeping: everything else on the loop (the cache layer's split, single
  flight, futures, joins, tasks, the event loop itself)

Each wrapper charges only its own steps (nested wrapped calls are charged to
their own phase). Each replay is run twice: plain, for the totals, and with
the wrappers (whose own ``thread_time`` calls cost CPU too), for the shares
of the phases, which are applied to the plain total. Work in other threads
(``asyncio.to_thread`` fdatasync, aiohttp's proxy look-ups) is "threads":
process CPU minus loop thread CPU. Totals are divided by the clusters
fetched from the base.

Usage:
    .venv/bin/python bench/cold_miss.py [--source file,http] [--readers 1,8]
        [--repeat 3] [--loop uvloop] [--plain] [--trace PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer
from bootcache.storm.trace import debian12, load_named
from remote_read import compact, make_cache, start_http, workdir

PHASES = ("fetch", "store", "metadata")


class Meter:
    """Thread CPU charged to the innermost running phase."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PHASES, 0.0)
        self.stack: list[list[float]] = []  # per active step: [child time]

    def wrap(self, fn: Callable[..., Awaitable[Any]], phase: str) -> Callable[..., Any]:
        meter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _Phased(fn(*args, **kwargs), phase, meter)
        return wrapper

    def wrap_sync(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        """The same for a call that does not await (a read that completes now)."""
        meter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _Phased(None, phase, meter)._step(fn, *args, **kwargs)
        return wrapper


class _Phased:
    """An awaitable stepping ``coro`` and timing each step."""

    def __init__(self, coro: Any, phase: str, meter: Meter) -> None:
        self.coro = coro.__await__() if coro is not None else None
        self.phase = phase
        self.meter = meter

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> _Phased:
        return self

    def __next__(self) -> Any:
        return self._step(self.coro.send, None)

    def send(self, value: Any) -> Any:
        return self._step(self.coro.send, value)

    def throw(self, *exc: Any) -> Any:
        return self._step(self.coro.throw, *exc)

    def close(self) -> None:
        self.coro.close()

    def _step(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        m = self.meter
        frame = [0.0]
        m.stack.append(frame)
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.thread_time() - t0
            m.stack.pop()
            m.spent[self.phase] += dt - frame[0]
            if m.stack:
                m.stack[-1][0] += dt


async def replay(cache: Path, requests: list[Any], readers: int,
                 phases: bool) -> dict[str, float]:
    layer = await open_layer(str(cache))
    assert isinstance(layer, CacheLayer)
    store = layer.store
    meter = Meter()
    if phases:
        store.read_below = meter.wrap(store.read_below, "fetch")  # type: ignore[method-assign]
        store.store = meter.wrap(store.store, "store")  # type: ignore[method-assign]
        # Misses served without waiting, and batched stores (where the cache has them).
        if hasattr(store, "read_below_nowait"):
            store.read_below_nowait = meter.wrap_sync(store.read_below_nowait, "fetch")
        if hasattr(store, "store_runs"):
            store.store_runs = meter.wrap(store.store_runs, "store")
        for name in ("flush", "save_records", "unmap"):
            setattr(store, name, meter.wrap(getattr(store, name), "metadata"))
    it = iter(requests)

    async def reader() -> None:
        for r in it:
            await layer.pread(r.offset, r.length)

    try:
        w0, t0, p0 = time.monotonic(), time.thread_time(), time.process_time()
        await asyncio.gather(*(reader() for _ in range(readers)))
        wall = time.monotonic() - w0
        await layer.settle()
        await layer.flush()
        t1, p1 = time.thread_time(), time.process_time()
        fetched = layer.counters.bytes_from_base / layer.cs
    finally:
        await layer.close()
    loop_cpu = t1 - t0
    per = 1e6 / fetched
    out = {"wall_s": wall, "clusters": fetched,
           "loop_us": loop_cpu * per, "threads_us": ((p1 - p0) - loop_cpu) * per}
    if phases:
        for ph in PHASES:
            out[f"{ph}_us"] = meter.spent[ph] * per
        out["bookkeeping_us"] = out["loop_us"] - sum(meter.spent.values()) * per
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="file,http")
    ap.add_argument("--readers", default="1,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trace", help="a shipped trace or a trace file")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--plain", action="store_true",
                    help="no phase split (for running under a sampling profiler)")
    ap.add_argument("--json")
    args = ap.parse_args()
    trace = load_named(args.trace) if args.trace else debian12()
    requests, size = compact(trace)
    runner: Callable[[Any], Any] = asyncio.run
    if args.loop == "uvloop":
        import uvloop
        runner = uvloop.run
    rows = []
    with workdir(False) as work:
        base = work / "base.raw"
        base.write_bytes(random.Random(5).randbytes(size))
        n = 0
        for source in args.source.split(","):
            sub = work / source
            sub.mkdir()
            srv = None
            if source == "http":
                srv, uri = start_http(sub, base, None)
            else:
                uri = str(base)
            try:
                for k in [int(x) for x in args.readers.split(",")]:
                    plain, metered = [], []
                    for _ in range(args.repeat):
                        for runs, phases in ((plain, False), (metered, True))[:2 - args.plain]:
                            n += 1
                            cache = make_cache(work, uri, size, n)
                            runs.append(runner(replay(cache, requests, k, phases)))
                            cache.unlink()
                    row: dict[str, Any] = {"source": source, "readers": k}
                    for key in plain[0]:
                        row[key] = round(statistics.median(r[key] for r in plain), 1)
                    # The split comes from the metered runs (their thread_time
                    # calls add to each phase): shown as shares of their total.
                    total = statistics.median(r["loop_us"] for r in metered or plain)
                    for ph in (*PHASES, "bookkeeping") if metered else ():
                        share = statistics.median(r[f"{ph}_us"] / r["loop_us"] for r in metered)
                        row[f"{ph}_us"] = round(share * row["loop_us"], 1)
                    row["meter_overhead_us"] = round(total - row["loop_us"], 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if srv:
                    srv.stop()
    cols = ["source", "readers", "wall_s", "clusters", "loop_us", "fetch_us", "store_us",
            "metadata_us", "bookkeeping_us", "threads_us", "meter_overhead_us"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
