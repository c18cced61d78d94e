"""HTTP source against a real nginx, plus a Python server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

import pytest

from bootcache.errors import SourceError, StaleBaseError
from bootcache.sources.http import HttpSource
from bootcache.sources.resilience import RemoteOptions, SourceChangedError

from .conftest import FaultyHttpServer, NginxServer, free_port, wait_until

FAST = RemoteOptions(timeout=1.0, connect_timeout=0.5, deadline=3.0, retries=20,
                     backoff=0.02, backoff_max=0.2)


def test_random_ranges_match_file(nginx: NginxServer) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    nginx.put("base.img", data)

    async def go() -> None:
        src = await HttpSource.open(nginx.url("base.img"), RemoteOptions(max_request=1 << 20))
        try:
            assert await src.size() == len(data)
            rng = random.Random(5)
            for _ in range(200):
                off = rng.randrange(len(data))
                n = rng.randrange(1, 256 * 1024)
                got = await src.pread(off, n)
                want = data[off:off + n]
                assert got == want + bytes(n - len(want))
            # The tail, across the end, past the end, and a read split into pieces.
            assert await src.pread(len(data) - 10, 10) == data[-10:]
            assert await src.pread(len(data) - 10, 30) == data[-10:] + bytes(20)
            assert await src.pread(len(data) + 5, 7) == bytes(7)
            assert await src.pread(0, 0) == b""
            assert await src.pread(1000, 3 << 20) == data[1000:1000 + (3 << 20)]
            assert await src.pread(0, len(data)) == data
            ident = src.identity()
            assert ident["kind"] == "http" and ident["size"] == len(data)
            assert ident["url"] == nginx.url("base.img")
            assert ident["etag"] and ident["last_modified"]
            stats = src.stats()
            assert stats["errors"] == 0 and stats["retries"] == 0
            assert stats["requests"] >= 205 and stats["bytes"] > len(data)
        finally:
            await src.close()

    asyncio.run(go())


def test_connections_are_reused(nginx: NginxServer) -> None:
    nginx.put("base.img", os.urandom(1 << 20))

    async def go() -> None:
        src = await HttpSource.open(nginx.url("base.img"), RemoteOptions(concurrency=4))
        try:
            await asyncio.gather(*(src.pread(i * 4096, 4096) for i in range(200)))
        finally:
            await src.close()

    asyncio.run(go())
    # nginx logs a request after answering it: give the last line a moment.
    wait_until(lambda: len(nginx.access_log()) >= 201, 5, "access log")
    log = nginx.access_log()
    assert len(log) == 201
    # Keep-alive and a bounded pool: a handful of connections carry everything.
    assert len({line[0] for line in log}) <= 5


def test_changed_object_is_detected(nginx: NginxServer) -> None:
    nginx.put("base.img", b"a" * 100_000)

    async def go() -> None:
        src = await HttpSource.open(nginx.url("base.img"))
        try:
            before = src.identity()
            assert await src.pread(0, 10) == b"a" * 10
            time.sleep(1.1)  # Last-Modified has one-second resolution
            nginx.put("base.img", b"b" * 100_000)
            now = await src.current_identity()
            assert now["etag"] != before["etag"]
            assert src.identity() == before
            # Reads are conditional on the version seen at open: never mix versions.
            with pytest.raises(SourceChangedError) as e:
                await src.pread(0, 10)
            assert isinstance(e.value, StaleBaseError)
        finally:
            await src.close()
        src = await HttpSource.open(nginx.url("base.img"))
        try:
            assert src.identity()["etag"] == now["etag"]
            assert await src.pread(0, 10) == b"b" * 10
        finally:
            await src.close()

    asyncio.run(go())


def test_server_ignoring_ranges(nginx: NginxServer) -> None:
    data = os.urandom(300_000)
    nginx.put("base.img", data)

    async def go() -> None:
        src = await HttpSource.open(nginx.url("base.img", "norange"))
        try:
            assert await src.size() == len(data)
            assert await src.pread(0, len(data)) == data  # whole object: a 200 is fine
            with pytest.raises(SourceError, match="ignores Range"):
                await src.pread(100, 1000)
            assert src.stats()["retries"] == 0  # refused at once, not retried
        finally:
            await src.close()

    asyncio.run(go())


def test_missing_object_is_permanent(nginx: NginxServer) -> None:
    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="404"):
            await HttpSource.open(nginx.url("nope.img"), FAST)
        assert time.monotonic() - t0 < 1.0

    asyncio.run(go())


def test_truncated_reply_never_returns_partial_data(faulty_http: FaultyHttpServer) -> None:
    async def go() -> None:
        src = await HttpSource.open(faulty_http.url, FAST)
        try:
            faulty_http.mode = "truncate"
            t0 = time.monotonic()
            with pytest.raises(SourceError):
                await src.pread(0, 65536)
            assert time.monotonic() - t0 < FAST.deadline + 1
            assert src.stats()["retries"] > 0
            faulty_http.mode = "ok"
            assert await src.pread(0, 65536) == faulty_http.data[:65536]
        finally:
            await src.close()

    asyncio.run(go())


def test_size_without_head(faulty_http: FaultyHttpServer) -> None:
    """A server refusing HEAD: the size comes from a one-byte ranged GET."""
    faulty_http.head_allowed = False

    async def go() -> None:
        src = await HttpSource.open(faulty_http.url, FAST)
        try:
            assert await src.size() == len(faulty_http.data)
            assert src.identity()["etag"] == '"v1"'
            assert await src.pread(10, 10) == faulty_http.data[10:20]
        finally:
            await src.close()

    asyncio.run(go())


def test_transient_errors_are_retried(faulty_http: FaultyHttpServer) -> None:
    async def go() -> None:
        src = await HttpSource.open(faulty_http.url, FAST)
        try:
            faulty_http.mode, faulty_http.n = "fail_n", 3
            assert await src.pread(4096, 4096) == faulty_http.data[4096:8192]
            stats = src.stats()
            assert stats["retries"] == 3 and stats["errors"] == 3 and stats["failures"] == 0
        finally:
            await src.close()

    asyncio.run(go())


def test_hanging_server_times_out(faulty_http: FaultyHttpServer) -> None:
    async def go() -> None:
        src = await HttpSource.open(faulty_http.url, FAST)
        try:
            faulty_http.mode = "hang"
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="timed out"):
                await src.pread(0, 4096)
            assert FAST.deadline - 0.5 < time.monotonic() - t0 < FAST.deadline + 1
        finally:
            await src.close()

    asyncio.run(go())


def test_server_stopped_mid_read_then_restarted(nginx: NginxServer) -> None:
    data = os.urandom(4 << 20)
    nginx.put("base.img", data)

    async def go() -> None:
        # /slow/ sends 1 MiB/s: the 2 MiB read is still running when nginx stops.
        src = await HttpSource.open(nginx.url("base.img", "slow"), FAST.with_overrides(
            timeout=3.0, deadline=3.0))
        try:
            stopper = threading.Timer(0.5, nginx.stop)
            stopper.start()
            t0 = time.monotonic()
            with pytest.raises(SourceError):
                await src.pread(0, 2 << 20)
            assert time.monotonic() - t0 < 3.0 + 1
            stopper.join()
            # Down for good: every read fails within the deadline, none hangs.
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="attempt"):
                await src.pread(4096, 4096)
            assert time.monotonic() - t0 < 3.0 + 1
            # Back: the same source recovers with no help.
            nginx.start()
            assert await src.pread(4096, 4096) == data[4096:8192]
            assert await src.pread(len(data) - 4096, 4096) == data[-4096:]
            assert src.stats()["failures"] == 2
        finally:
            await src.close()

    asyncio.run(go())


def test_server_restarted_during_read_recovers(nginx: NginxServer) -> None:
    data = os.urandom(4 << 20)
    nginx.put("base.img", data)

    async def go() -> None:
        src = await HttpSource.open(nginx.url("base.img", "slow"), FAST.with_overrides(
            timeout=4.0, deadline=10.0))

        def bounce() -> None:
            nginx.stop()
            time.sleep(0.5)
            nginx.start()

        try:
            bouncer = threading.Timer(0.3, bounce)
            bouncer.start()
            # The first attempt dies with the server; a retry after the restart wins.
            assert await src.pread(0, 2 << 20) == data[:2 << 20]
            bouncer.join()
            assert src.stats()["retries"] >= 1
        finally:
            await src.close()

    asyncio.run(go())


def test_https(tmp_path: Path, tls_dir: Path) -> None:
    server = NginxServer(tmp_path, tls_dir=tls_dir)
    data = os.urandom(200_000)
    server.put("base.img", data)
    server.start()

    async def go() -> None:
        src = await HttpSource.open(server.url("base.img"), FAST,
                                    ca_file=str(tls_dir / "ca-cert.pem"))
        try:
            assert await src.pread(100, 150_000) == data[100:150_100]
        finally:
            await src.close()
        # An unknown CA is refused at once, not retried until the deadline.
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"(?i)certificate"):
            await HttpSource.open(server.url("base.img"), FAST)
        assert time.monotonic() - t0 < 1.0
        src = await HttpSource.open(server.url("base.img"), FAST, insecure=True)
        await src.close()

    try:
        assert server.url("x").startswith("https://")
        asyncio.run(go())
    finally:
        server.stop()


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown"):
        RemoteOptions.from_mapping({"timeuot": 1})
    with pytest.raises(ValueError, match="not a number"):
        RemoteOptions.from_mapping({"timeout": "soon"})
    with pytest.raises(ValueError, match="deadline"):
        RemoteOptions.from_mapping({"timeout": "10", "deadline": "5"})
    assert RemoteOptions.from_mapping({"retries": "3", "deadline": "60"}).retries == 3
    # Dependent defaults follow an explicit timeout.
    short = RemoteOptions.from_mapping({"timeout": "1"})
    assert (short.connect_timeout, short.deadline) == (1.0, RemoteOptions().deadline)
    assert RemoteOptions.from_mapping({"timeout": 100}).deadline == 100


def test_proxy_from_environment_is_read_once(faulty_http: FaultyHttpServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY is honoured, and read at open: nothing listens at the URL's
    own port, so every byte must come through the proxy named at open, even
    after the environment changes."""
    url = f"http://127.0.0.1:{free_port()}/object"  # nothing listens there
    for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{faulty_http.port}")

    async def go() -> None:
        src = await HttpSource.open(url, FAST)
        try:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
            before = faulty_http.requests
            assert await src.pread(4096, 8192) == faulty_http.data[4096:12288]
            assert faulty_http.requests == before + 1
        finally:
            await src.close()
        with pytest.raises(SourceError):  # without trust_env, the URL's own (dead) port
            await HttpSource.open(url, FAST, trust_env=False)

    asyncio.run(go())
