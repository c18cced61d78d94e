"""S3 source against a real SeaweedFS S3 gateway on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from bootcache.errors import SourceError
from bootcache.sources.resilience import RemoteOptions, SourceChangedError
from bootcache.sources.s3 import S3Source, parse_s3_url

from .conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    FaultyHttpServer,
    WeedServer,
    put_s3,
    wait_s3_readable,
)

FAST = RemoteOptions(timeout=1.0, connect_timeout=0.5, deadline=3.0, retries=20,
                     backoff=0.02, backoff_max=0.2)


def test_parse_url() -> None:
    assert parse_s3_url("s3://bucket/a/b/c.img") == ("bucket", "a/b/c.img")
    for bad in ("s3://bucket", "s3:///key", "http://x/y"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_random_ranges_match_object(weed: WeedServer) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    put_s3(weed, "images", "bases/base.img", data)

    async def go() -> None:
        src = await S3Source.open("s3://images/bases/base.img",
                                  RemoteOptions(max_request=1 << 20))
        try:
            assert await src.size() == len(data)
            rng = random.Random(3)
            for _ in range(100):
                off = rng.randrange(len(data))
                n = rng.randrange(1, 200_000)
                want = data[off:off + n]
                assert await src.pread(off, n) == want + bytes(n - len(want))
            assert await src.pread(len(data) - 1, 1) == data[-1:]
            assert await src.pread(len(data) - 5, 10) == data[-5:] + bytes(5)
            assert await src.pread(len(data), 10) == bytes(10)
            assert await src.pread(0, len(data)) == data
            ident = src.identity()
            assert ident["kind"] == "s3" and ident["size"] == len(data)
            assert ident["etag"] and ident["last_modified"]
            assert ident["endpoint"] == weed.endpoint
            stats = src.stats()
            assert stats["errors"] == 0 and stats["bytes"] >= len(data)
        finally:
            await src.close()

    asyncio.run(go())


def test_changed_object_is_detected(weed: WeedServer) -> None:
    put_s3(weed, "images", "changing.img", b"a" * 50_000)

    async def go() -> None:
        src = await S3Source.open("s3://images/changing.img")
        try:
            before = src.identity()
            assert await src.pread(0, 4) == b"aaaa"
            put_s3(weed, "images", "changing.img", b"b" * 50_000)
            assert (await src.current_identity())["etag"] != before["etag"]
            with pytest.raises(SourceChangedError):
                await src.pread(0, 4)
        finally:
            await src.close()

    asyncio.run(go())


def test_config_from_profile(weed: WeedServer, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoint, region and keys from ~/.aws files and AWS_PROFILE, as the SDKs do."""
    put_s3(weed, "images", "profiled.img", b"xyz" * 1000)
    config, creds = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile weedy]\nregion = us-east-1\nendpoint_url = {weed.endpoint}\n")
    creds.write_text(f"[weedy]\naws_access_key_id = {S3_ACCESS_KEY}\n"
                     f"aws_secret_access_key = {S3_SECRET_KEY}\n")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "weedy")

    async def go() -> None:
        src = await S3Source.open("s3://images/profiled.img")
        try:
            assert await src.pread(3, 6) == b"xyzxyz"
        finally:
            await src.close()

    asyncio.run(go())


def test_bad_credentials_and_missing_key_fail_fast(weed: WeedServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    put_s3(weed, "images", "present.img", b"1234")

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="HeadObject"):
            await S3Source.open("s3://images/absent.img", FAST)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(SourceError, match="HeadObject"):
            await S3Source.open("s3://images/present.img", FAST)
        # Permanent errors are not retried until the deadline.
        assert time.monotonic() - t0 < FAST.deadline

    asyncio.run(go())


def test_truncated_reply_never_returns_partial_data(
        faulty_http: FaultyHttpServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An S3 endpoint that cuts bodies short: retries, then SourceError, never short data."""
    for var, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    async def go() -> None:
        src = await S3Source.open("s3://bucket/object", FAST,
                                  endpoint_url=f"http://127.0.0.1:{faulty_http.port}",
                                  addressing_style="path")
        try:
            assert await src.pread(100, 1000) == faulty_http.data[100:1100]
            faulty_http.mode = "truncate"
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="attempt"):
                await src.pread(0, 65536)
            assert time.monotonic() - t0 < FAST.deadline + 1
            faulty_http.mode = "ok"
            assert await src.pread(0, 65536) == faulty_http.data[:65536]
        finally:
            await src.close()

    asyncio.run(go())


def test_server_down_then_back(weed_private: WeedServer) -> None:
    data = os.urandom(2 << 20)
    put_s3(weed_private, "images", "base.img", data)

    async def go() -> None:
        src = await S3Source.open("s3://images/base.img", FAST.with_overrides(
            max_request=256 << 10))
        try:
            assert await src.pread(0, 4096) == data[:4096]

            # Reads in flight while the server dies: each returns the right
            # bytes or raises SourceError; none returns anything else, none hangs.
            async def reader(i: int) -> str:
                rng = random.Random(i)
                outcome = "ok"
                for _ in range(50):
                    off = rng.randrange(len(data) - 65536)
                    try:
                        got = await src.pread(off, 65536)
                    except SourceError:
                        return "error"
                    assert got == data[off:off + 65536]
                    await asyncio.sleep(0.01)
                return outcome

            readers = [asyncio.create_task(reader(i)) for i in range(4)]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            await asyncio.to_thread(weed_private.stop, signal.SIGKILL)
            outcomes = await asyncio.gather(*readers)
            assert "error" in outcomes
            assert time.monotonic() - t0 < FAST.deadline + 1.5

            t0 = time.monotonic()
            with pytest.raises(SourceError, match="attempt"):
                await src.pread(8192, 4096)
            assert time.monotonic() - t0 < FAST.deadline + 0.5

            await asyncio.to_thread(weed_private.start, 60)
            await asyncio.to_thread(wait_s3_readable, weed_private, "images", "base.img")
            assert await src.pread(len(data) - 4096, 4096) == data[-4096:]
            assert await src.pread(0, len(data)) == data
        finally:
            await src.close()

    asyncio.run(go())
