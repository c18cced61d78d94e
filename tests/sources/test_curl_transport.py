"""The libcurl transport and the sources on it, against a real nginx and SeaweedFS:
keep-alive, bodies cut short, error statuses, a request cancelled mid-reply,
and an object replaced in the middle of a read."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bootcache.errors import SourceError
from bootcache.sources.curl_transport import CurlSettings, CurlTransport, TransferFailed
from bootcache.sources.http import HttpSource
from bootcache.sources.resilience import RemoteOptions, SourceChangedError
from bootcache.sources.s3 import S3Source

from .conftest import NginxServer, WeedServer, _with_s3_client, put_s3, wait_until

FAST = RemoteOptions(timeout=1.0, connect_timeout=0.5, deadline=3.0, retries=20,
                     backoff=0.02, backoff_max=0.2)
SETTINGS = CurlSettings(connect_timeout=1.0, timeout=10.0, max_connections=4)


def test_keep_alive_reuses_connections(nginx: NginxServer) -> None:
    data = os.urandom(1 << 20)
    nginx.put("base.img", data)
    url = nginx.url("base.img")

    async def go() -> int:
        transport = CurlTransport(SETTINGS)
        try:
            head = await transport.head(url)
            assert head.status == 200 and head.headers["content-length"] == str(len(data))
            for i in range(50):  # one after another
                r = await transport.get(url, start=i * 4096, end=i * 4096 + 4095, limit=4096)
                assert r.status == 206 and r.body == data[i * 4096:(i + 1) * 4096]

            async def one(i: int) -> None:
                off = i * 8192
                r = await transport.get(url, start=off, end=off + 8191, limit=8192)
                assert r.body == data[off:off + 8192]

            for batch in range(10):  # four at a time
                await asyncio.gather(*(one(batch * 4 + k) for k in range(4)))
            return transport.connects
        finally:
            await transport.close()

    connects = asyncio.run(go())
    wait_until(lambda: len(nginx.access_log()) >= 91, 5, "access log")
    log = nginx.access_log()
    assert len(log) == 91
    used = {line[0] for line in log}
    # Never more connections than requests at once, and what nginx saw is what we counted.
    assert len(used) <= 4 and connects == len(used)
    assert max(int(line[1]) for line in log) >= 20  # many requests per connection


def test_kept_connection_closed_by_the_server(nginx: NginxServer) -> None:
    """A kept-alive connection stays watched between requests. When the server
    closes it (a restart), the next request opens another one, whether the
    loop saw the close or not (libcurl finds the connection dead and closes
    it, and the new one likely gets the same socket number), and whether or
    not the number was meanwhile taken by a file."""
    data = os.urandom(1 << 20)
    nginx.put("base.img", data)
    url = nginx.url("base.img")

    async def go() -> int:
        transport = CurlTransport(SETTINGS)
        held: list[int] = []
        try:
            for i in range(6):
                r = await transport.get(url, start=i * 4096, end=i * 4096 + 4095, limit=4096)
                assert r.status == 206 and r.body == data[i * 4096:(i + 1) * 4096]
                if i % 2:
                    # The loop runs meanwhile: it sees the kept connection close.
                    await asyncio.to_thread(nginx.stop)
                    await asyncio.to_thread(nginx.start)
                else:
                    nginx.stop()  # the loop is held: it does not
                    nginx.start()
                if i % 3 == 2:
                    # Take the lowest free number, as another part of a node would.
                    held.append(os.open(os.devnull, os.O_RDONLY))
            async with asyncio.timeout(10):
                r = await transport.get(url, start=0, end=99, limit=100)
            assert r.status == 206 and r.body == data[:100]
            return transport.connects
        finally:
            await transport.close()
            for fd in held:
                os.close(fd)

    assert asyncio.run(go()) == 7  # one connection per server run


def test_statuses(nginx: NginxServer) -> None:
    nginx.put("base.img", b"x" * 1000)

    async def go() -> None:
        transport = CurlTransport(SETTINGS)
        try:
            r = await transport.get(nginx.url("base.img"), start=5000, end=5999, limit=1000)
            assert r.status == 416 and r.headers["content-range"] == "bytes */1000"
            r = await transport.get(nginx.url("nope.img"), start=0, end=9, limit=4096)
            assert (r.status, r.reason) == (404, "Not Found")
            r = await transport.get(nginx.url("x", "unavailable"), start=0, end=9, limit=4096)
            assert r.status == 503
            # A body longer than the limit is cut off and flagged, never passed as whole.
            r = await transport.get(nginx.url("base.img", "norange"), start=0, end=9, limit=10)
            assert r.status == 200 and r.overflow and len(r.body) <= 10
            r = await transport.get(nginx.url("base.img"), start=10, end=19, limit=10)
            assert r.status == 206 and not r.overflow and r.body == b"x" * 10
        finally:
            await transport.close()

    asyncio.run(go())


def test_unavailable_server_is_retried_then_fails(nginx: NginxServer) -> None:
    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="503") as e:
            await HttpSource.open(nginx.url("base.img", "unavailable"), FAST)
        assert "attempt" in str(e.value)
        assert FAST.deadline - 1 < time.monotonic() - t0 < FAST.deadline + 1

    asyncio.run(go())
    assert len(nginx.access_log()) > 3  # retried, not given up at once


def test_body_cut_short_is_a_transient_failure(nginx: NginxServer) -> None:
    data = os.urandom(8 << 20)
    nginx.put("base.img", data)

    async def go() -> None:
        transport = CurlTransport(SETTINGS)
        try:
            # /slow/ sends 1 MiB/s: the server goes away with most of the body unsent.
            stopper = threading.Timer(0.5, nginx.stop)
            stopper.start()
            with pytest.raises(TransferFailed) as e:
                await transport.get(nginx.url("base.img", "slow"), start=0,
                                    end=len(data) - 1, limit=len(data))
            stopper.join()
            assert not e.value.permanent
        finally:
            await transport.close()

    asyncio.run(go())


def test_cancelled_request_leaves_the_transport_usable(nginx: NginxServer) -> None:
    data = os.urandom(2 << 20)
    nginx.put("base.img", data)

    async def go() -> None:
        transport = CurlTransport(SETTINGS)
        try:
            slow = asyncio.ensure_future(transport.get(
                nginx.url("base.img", "slow"), start=0, end=len(data) - 1, limit=len(data)))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await slow
            r = await transport.get(nginx.url("base.img"), start=0, end=99, limit=100)
            assert r.status == 206 and r.body == data[:100]
        finally:
            await transport.close()

    asyncio.run(go())


def test_cancellations_never_leak_bytes_into_later_requests(nginx: NginxServer) -> None:
    """Requests cancelled at random points (a cancelled handle leaves the multi,
    closing its connection, before it is reused): every later reply is exact."""
    data = os.urandom(8 << 20)
    nginx.put("base.img", data)
    url = nginx.url("base.img")

    async def go() -> None:
        transport = CurlTransport(SETTINGS)
        rng = random.Random(7)
        try:
            async def one(off: int, n: int) -> None:
                r = await transport.get(url, start=off, end=off + n - 1, limit=n)
                assert r.status == 206 and r.body == data[off:off + n]

            for _ in range(20):
                tasks = [asyncio.ensure_future(one(rng.randrange(len(data) - (1 << 20)),
                                                   rng.randrange(1, 1 << 20)))
                         for _ in range(8)]
                await asyncio.sleep(0)  # some are on the wire, some not yet
                for t in tasks[::2]:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for t, result in zip(tasks, results, strict=True):
                    if not t.cancelled():
                        assert result is None, result
            for _ in range(100):
                await one(rng.randrange(len(data) - 65536), 65536)
        finally:
            await transport.close()

    asyncio.run(go())


def test_http_object_replaced_mid_read(tmp_path: Path) -> None:
    """A read made of many requests while the object is replaced: it returns
    the old bytes whole or raises SourceChangedError, never a mix."""
    # Each request takes about a second, however fast the machine: nginx's
    # limit_rate lets one second's worth (32 KiB) go at once, the other half
    # of a 64 KiB reply a second later. A fast location would let a loop
    # turn finish every request of the read before the test can act.
    nginx = NginxServer(tmp_path / "storage", slow_rate="32k")
    old, new = os.urandom(4 << 16), os.urandom(4 << 16)
    nginx.put("base.img", old)
    nginx.start()

    async def go() -> None:
        # 4 requests of 64 KiB, one at a time.
        src = await HttpSource.open(nginx.url("base.img", "slow"), RemoteOptions(
            max_request=64 << 10, concurrency=1))
        try:
            read = asyncio.ensure_future(src.pread(0, len(old)))
            while src.stats()["bytes"] == 0:  # until the first request is answered
                await asyncio.sleep(0)
            # The second request may be on the wire (it gets the old version);
            # the third cannot start for another second and sees the new one.
            nginx.put("base.img", new)
            with pytest.raises(SourceChangedError):
                await read
            assert 0 < src.stats()["bytes"] < len(old)
        finally:
            await src.close()

    try:
        asyncio.run(go())
    finally:
        nginx.stop()


def test_s3_reads_reuse_connections_and_see_a_replacement(weed: WeedServer) -> None:
    data = os.urandom(1 << 20)
    put_s3(weed, "images", "curl.img", data)

    async def go() -> None:
        src = await S3Source.open("s3://images/curl.img", RemoteOptions(concurrency=4))
        try:
            await asyncio.gather(*(src.pread(i * 4096, 4096) for i in range(100)))
            for i in range(50):
                assert await src.pread(i * 777, 1000) == data[i * 777:i * 777 + 1000]
            stats = src.stats()
            assert stats["requests"] >= 150 and stats["errors"] == 0
            assert stats["connections_opened"] <= 4
            # Replaced between two requests of the same source: the next one fails.
            await asyncio.to_thread(put_s3, weed, "images", "curl.img", os.urandom(1 << 20))
            with pytest.raises(SourceChangedError):
                await src.pread(0, 4096)
        finally:
            await src.close()

    asyncio.run(go())


def test_s3_missing_key_is_permanent(weed: WeedServer) -> None:
    put_s3(weed, "images", "short-lived.img", b"abc" * 100)

    async def go() -> None:
        src = await S3Source.open("s3://images/short-lived.img", FAST)
        try:
            async def delete(c: Any) -> None:
                await c.delete_object(Bucket="images", Key="short-lived.img")

            await asyncio.to_thread(_with_s3_client, weed, delete)
            t0 = time.monotonic()
            with pytest.raises(SourceError, match=r"NoSuchKey|404"):
                await src.pread(0, 10)
            assert time.monotonic() - t0 < 1.0 and src.stats()["retries"] == 0
        finally:
            await src.close()

    asyncio.run(go())
