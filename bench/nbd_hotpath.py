"""Per-request CPU cost of the server's read path, without sockets or a client.

Feeds batches of 16 x 4K READ requests (as one data_received call, as a
queue-depth-16 client would; --batch 1: one request per call, as each of
64 connections with one request in flight sends them) into a server connection whose transport only
counts bytes, over a raw file in the page cache. Reports microseconds per
request; with --profile, the top functions under cProfile.

    .venv/bin/python bench/nbd_hotpath.py [--requests 200000] [--batch 16] [--profile]
        [--image PATH]

--image serves that image (opened as ``bootcache serve`` opens it, e.g. a
warm cache) instead of a fresh raw file.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import tempfile
import time
from typing import Any

from bootcache.layers.chain import open_layer
from bootcache.layers.raw import RawLayer
from bootcache.nbd import wire as w
from bootcache.nbd.server import NBDProtocol, NBDServer
from bootcache.sources.file import FileSource


class CountingTransport:
    """Just enough of an asyncio transport: counts what is written."""

    def __init__(self, proto: NBDProtocol) -> None:
        self.written = 0
        self.proto = proto

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, bufs: list[bytes]) -> None:
        for b in bufs:
            self.written += len(b)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.proto.connection_lost(None)

    abort = close


def handshake(name: str) -> bytes:
    raw = name.encode()
    go = w.U32.pack(len(raw)) + raw + w.U16.pack(0)
    return (w.CLIENT_FLAGS.pack(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES)
            + w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_STRUCTURED_REPLY, 0)
            + w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_GO, len(go)) + go)


async def run(requests: int, profile: bool, image: str | None, per_batch: int) -> None:
    size = 64 << 20
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        f.write(os.urandom(size))
        f.flush()
        if image:
            layer = await open_layer(image)
            size = layer.size
            for off in range(0, size, 1 << 20):  # warm it (fills a cache image)
                await layer.pread(off, min(1 << 20, size - off))
        else:
            layer = await RawLayer.open(FileSource(f.name), read_only=True)
        server = NBDServer({"d": layer})
        proto = NBDProtocol(server)
        transport = CountingTransport(proto)
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(handshake("d"))
        rng = random.Random(1)
        batches = [b"".join(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, h,
                                           rng.randrange(size >> 12) << 12, 4096)
                            for h in range(per_batch)) for _ in range(64)]
        rounds = requests // per_batch
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        start = time.perf_counter()
        cpu_start = time.thread_time()
        for i in range(rounds):
            proto.data_received(batches[i & 63])
            while proto._tasks:  # requests that had to wait: let them finish
                await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu_start
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        assert transport.written >= rounds * per_batch * 4096
        print(f"{elapsed / (rounds * per_batch) * 1e6:.2f} us per 4K read "
              f"({rounds * per_batch / elapsed:,.0f} requests/s on one core, no socket); "
              f"CPU {cpu / (rounds * per_batch) * 1e6:.2f} us per read (thread time: "
              f"what the machine's other load does not add)")
        await server.shutdown()
        await layer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=16, help="requests per data_received")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--image", help="serve this image instead of a raw temporary file")
    args = ap.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(run(args.requests, args.profile, args.image, args.batch))


if __name__ == "__main__":
    main()
