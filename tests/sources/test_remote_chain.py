"""Raw and qcow2 bases read through every remote source, via the chain opener.

The qcow2 engine reads its metadata through byte ranges, so a qcow2 base
behind HTTP, S3 or NBD must give the same guest bytes as qemu-img does
locally, and a local overlay naming the remote base must follow it.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bootcache.layers.chain import ChainPolicy, open_layer

from .conftest import NbdkitServer, NbdServer, NginxServer, QemuNbdServer, WeedServer, put_s3

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SIZE = 8 << 20


def make_images(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A sparse raw disk with data islands, and the same disk as compressed qcow2."""
    raw = tmp_path / "disk.raw"
    rng = random.Random(7)
    guest = bytearray(SIZE)
    for _ in range(24):
        off = rng.randrange(0, SIZE - 200_000)
        n = rng.randrange(1, 200_000)
        guest[off:off + n] = os.urandom(n // 2) * 2 + os.urandom(n % 2)  # compressible
    raw.write_bytes(guest)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c",
                    "-o", "cluster_size=65536", str(raw), str(qcow2)], check=True)
    return raw, qcow2, bytes(guest)


async def read_all(uri: str, guest: bytes, fmt: str | None = None) -> bytes:
    layer = await open_layer(uri, fmt=fmt, policy=ChainPolicy())
    try:
        assert layer.size == SIZE
        rng = random.Random(1)
        for _ in range(50):  # unaligned reads cross cluster and L2 boundaries
            off = rng.randrange(SIZE - 300_000)
            n = rng.randrange(1, 300_000)
            assert await layer.pread(off, n) == guest[off:off + n]
        return await layer.pread(0, SIZE)
    finally:
        await layer.close()


def check_both(tmp_path: Path, url_of: Callable[[str, bytes], str]) -> None:
    """``url_of(name, content)`` publishes a file and returns its URI."""
    raw, qcow2, guest = make_images(tmp_path)
    raw_url = url_of("disk.raw", raw.read_bytes())
    qcow2_url = url_of("disk.qcow2", qcow2.read_bytes())

    async def go() -> None:
        assert await read_all(raw_url, guest, "raw") == guest
        assert await read_all(qcow2_url, guest) == guest  # probed as qcow2
        # A local overlay whose backing file is the remote qcow2 (-u: qemu-img
        # itself cannot open s3:// to check it).
        overlay = tmp_path / "vm.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "qcow2",
                        "-b", qcow2_url, str(overlay), str(SIZE)], check=True)
        assert await read_all(str(overlay), guest) == guest

    asyncio.run(go())


def test_http_bases(tmp_path: Path, nginx: NginxServer) -> None:
    def publish(name: str, content: bytes) -> str:
        nginx.put(name, content)
        return nginx.url(name)

    check_both(tmp_path, publish)


def test_s3_bases(tmp_path: Path, weed: WeedServer) -> None:
    def publish(name: str, content: bytes) -> str:
        put_s3(weed, "chain", name, content)
        return f"s3://chain/{name}"

    check_both(tmp_path, publish)


@pytest.mark.parametrize("server_kind", ["qemu-nbd", "nbdkit"])
def test_nbd_bases(server_kind: str, tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    def publish(name: str, content: bytes) -> str:
        path = tmp_path / "exports" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        server: NbdServer
        if server_kind == "qemu-nbd":
            # The file's bytes as they are: bootcache parses the qcow2 itself.
            server = QemuNbdServer(tmp_path / f"srv-{name}", path, fmt="raw", unix=True)
        else:
            server = NbdkitServer(tmp_path / f"srv-{name}", ["file", str(path)])
        nbd_servers.append(server)
        server.start()
        return server.uri

    check_both(tmp_path, publish)
