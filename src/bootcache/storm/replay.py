"""Replaying a boot trace from many simulated VMs at once.

Each VM has its own NBD connection and issues the trace's reads in order,
one at a time (a booting guest mostly waits on each read). Between reads it
"thinks" for the recorded gap times ``gap_scale``, modelling guest CPU time;
``gap_scale`` 0 is pure I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bootcache.errors import BootcacheError
from bootcache.nbd.client import NbdConnection, parse_nbd_uri
from bootcache.storm.trace import Trace

# Think time is slept in slices no shorter than this (shorter sleeps overshoot).
_MIN_SLEEP = 0.002


@dataclass
class VmResult:
    seconds: float
    reads: int
    bytes: int
    verified: int
    #: Seconds each read took, from request to reply (in trace order).
    latencies: list[float] = field(default_factory=list)


class WrongBytes(BootcacheError):
    """A replayed read returned bytes that differ from the base's."""


async def replay_one(uri: str, trace: Trace, *, gap_scale: float = 0.0,
                     expected: Callable[[int, int], bytes] | None = None,
                     verify_every: int = 1,
                     ready: asyncio.Queue[None] | None = None,
                     start: asyncio.Event | None = None) -> VmResult:
    """One VM: connect, report ``ready``, wait for ``start``, replay, return its boot time."""
    conn = await NbdConnection.connect(parse_nbd_uri(uri))
    try:
        if ready is not None:
            ready.put_nowait(None)
        if start is not None:
            await start.wait()
        reqs = trace.requests
        debt = 0.0
        verified = 0
        nbytes = 0
        latencies = []
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            sent = time.perf_counter()
            data = await conn.pread(r.offset, r.length)
            latencies.append(time.perf_counter() - sent)
            nbytes += len(data)
            if expected is not None and i % verify_every == 0:
                if data != expected(r.offset, r.length):
                    raise WrongBytes(f"{uri}: read {r.offset}+{r.length} returned wrong bytes")
                verified += 1
            if gap_scale and i + 1 < len(reqs):
                debt += (reqs[i + 1].time - r.time) * gap_scale
                if debt >= _MIN_SLEEP:
                    before = time.perf_counter()
                    await asyncio.sleep(debt)
                    debt -= time.perf_counter() - before
        return VmResult(time.perf_counter() - t0, len(reqs), nbytes, verified, latencies)
    finally:
        await conn.close()


async def replay_storm(uri: str, trace: Trace, n: int, *, gap_scale: float = 0.0,
                       expected: Callable[[int, int], bytes] | None = None,
                       verify: str = "all") -> list[VmResult]:
    """``n`` VMs replaying at once; each VM's boot time is measured separately.

    Every VM connects first; the storm starts when all are connected, so the
    N boots truly overlap. ``verify`` "all" checks every read of every VM
    against ``expected``; "sample" checks every read of the first VM and 1 in
    16 reads of the others (checking costs client CPU that the VMs share).
    """
    ready: asyncio.Queue[None] = asyncio.Queue()
    start = asyncio.Event()
    tasks = [asyncio.create_task(replay_one(
        uri, trace, gap_scale=gap_scale, expected=expected,
        verify_every=1 if verify == "all" or k == 0 else 16, ready=ready, start=start))
        for k in range(n)]
    try:
        for _ in range(n):
            getter = asyncio.ensure_future(ready.get())
            done, _pending = await asyncio.wait([getter, *tasks],
                                                return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                for t in done:
                    t.result()  # a VM failed to connect: raise its error
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
