"""open_source: one entry point from a backing-file name to a byte source."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bootcache.errors import SourceError
from bootcache.layers.uri import check_options, file_path, open_source, source_kind
from bootcache.sources.file import FileSource
from bootcache.sources.http import HttpSource
from bootcache.sources.s3 import S3Source

from .conftest import NginxServer, WeedServer, put_s3


def test_kinds() -> None:
    assert source_kind("/var/lib/base.img") == "file"
    assert source_kind("rel/base.img") == "file"
    assert source_kind("file:///var/lib/base.img") == "file"
    assert source_kind("https://example.com/b.img") == "http"
    assert source_kind("HTTP://example.com/b.img") == "http"
    assert source_kind("s3://bucket/key") == "s3"
    for uri in ("nbd://h/x", "nbd+unix:///x?socket=/s", "nbds://h:10809/x", "nbds+unix:///x"):
        assert source_kind(uri) == "nbd"
    with pytest.raises(ValueError, match="scheme"):
        source_kind("ftp://example.com/x")


def test_file_paths() -> None:
    assert file_path("file:///a%20b/c.img") == "/a b/c.img"
    assert file_path("file://localhost/x") == "/x"
    assert file_path("plain name.img") == "plain name.img"
    with pytest.raises(ValueError):
        file_path("file://otherhost/x")


def test_options_are_checked_per_kind() -> None:
    assert check_options("http", {"timeout": 3, "insecure": "yes"}) == \
        {"timeout": 3, "insecure": True}
    with pytest.raises(ValueError, match="does not apply"):
        check_options("file", {"timeout": 3})
    with pytest.raises(ValueError, match="does not apply"):
        check_options("s3", {"headers": {}})
    with pytest.raises(ValueError, match="boolean"):
        check_options("http", {"if_match": "maybe"})


def test_open_each_kind(tmp_path: Path, nginx: NginxServer, weed: WeedServer) -> None:
    data = os.urandom(100_000)
    (tmp_path / "local.img").write_bytes(data)
    nginx.put("remote.img", data)
    put_s3(weed, "images", "uri.img", data)

    async def go() -> None:
        for uri, cls in ((str(tmp_path / "local.img"), FileSource),
                         (f"file://{tmp_path}/local.img", FileSource),
                         (nginx.url("remote.img"), HttpSource),
                         ("s3://images/uri.img", S3Source)):
            opts = {} if cls is FileSource else {"timeout": 5, "deadline": 10}
            src = await open_source(uri, **opts)
            try:
                assert isinstance(src, cls)
                assert await src.size() == len(data)
                assert await src.pread(777, 1000) == data[777:1777]
            finally:
                await src.close()
        with pytest.raises(SourceError, match="read-only"):
            await open_source(nginx.url("remote.img"), writable=True)

    asyncio.run(go())
