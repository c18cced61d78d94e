"""Publishing to SeaweedFS S3 (multipart) and pulling over S3 and HTTP (nginx):
an interrupted pull resumes where it stopped, a damaged partial download is
caught by the digest and started over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cache.conftest import assert_qemu_check, create_cache, make_base
from sources.conftest import NginxServer, WeedServer, _with_s3_client, put_s3

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    MiB,
    bootcache,
    child_env,
    leftovers,
    run,
    wait_for,
    warm,
)


def cached_only(image: Path) -> str:
    """The image with no backing file: only its own clusters read as data."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(image)}})


def check_cached(image: Path) -> None:
    """qemu-img check of an image whose base QEMU cannot open (s3://)."""
    report = json.loads(run([QEMU_IMG, "check", "--output", "json", cached_only(image)]).stdout)
    assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, report


def compare_cached(a: Path, b: Path) -> None:
    run([QEMU_IMG, "compare", cached_only(a), cached_only(b)])


def big_warm_cache(tmp_path: Path, backing: str, quota: str = "40M") -> Path:
    """A cache holding 24 MiB of random (incompressible) clusters."""
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, backing, quota=quota)
    warm(cache, [(c * CLUSTER, CLUSTER) for c in range(0, 768, 2)])
    return cache


def test_publish_to_s3_and_pull_from_s3(tmp_path: Path, weed: WeedServer) -> None:
    base = os.urandom(48 * MiB)
    put_s3(weed, "pub", "images/base.raw", base)
    cache = big_warm_cache(tmp_path, "s3://pub/images/base.raw")
    out = json.loads(bootcache("cache", "publish", "--output", "json", cache,
                               "s3://pub/caches/boot.qcow2").stdout)
    assert out["artifact-bytes"] > 16 * MiB  # more than one part
    # Refused by the store (a wrong secret): a clear error, no object, nothing left.
    env = dict(child_env(), AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = bootcache("cache", "publish", cache, "s3://pub/caches/refused.qcow2", check=False,
                     env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "SignatureDoesNotMatch" in err and "Traceback" not in err, err

    async def head(c: Any) -> dict[str, Any]:
        r: dict[str, Any] = await c.head_object(Bucket="pub", Key="caches/boot.qcow2")
        return r

    obj = _with_s3_client(weed, head)
    assert obj["ContentLength"] == out["artifact-bytes"]
    assert obj["ETag"].strip('"').endswith("-2"), obj["ETag"]  # a two-part upload
    node_b = tmp_path / "node-b"
    node_b.mkdir()
    res = json.loads(bootcache("cache", "pull", "--output", "json",
                               "s3://pub/caches/boot.qcow2", node_b / "cache.qcow2").stdout)
    assert res["clusters"] == 384 and res["downloaded-bytes"] == out["artifact-bytes"]
    check_cached(node_b / "cache.qcow2")
    compare_cached(node_b / "cache.qcow2", cache)
    assert leftovers(node_b) == []
    # The base replaced in S3: the published cache no longer matches it.
    put_s3(weed, "pub", "images/base.raw", os.urandom(48 * MiB))
    proc = bootcache("cache", "pull", "s3://pub/caches/boot.qcow2", node_b / "again.qcow2",
                     check=False)
    assert proc.returncode == 1 and "another base" in proc.stderr.decode(), proc.stderr
    assert leftovers(node_b) == [] and not (node_b / "again.qcow2").exists()


def start_pull(url: str, dest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bootcache", "cache", "pull", "--output",
                             "json", url, dest], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env())


def test_interrupted_pull_over_http_resumes(tmp_path: Path, nginx: NginxServer) -> None:
    make_base(tmp_path / "base.raw", 48 * MiB, seed=8)
    cache = big_warm_cache(tmp_path, "base.raw")
    art = nginx.root / "boot.qcow2"
    bootcache("cache", "publish", cache, art)
    size = art.stat().st_size
    url = nginx.url("boot.qcow2", "slow")  # 1 MB/s a connection: a pull takes seconds
    pulled = tmp_path / "pulled.qcow2"
    part = tmp_path / ".pulled.qcow2.pull"

    def killed_part_way() -> int:
        proc = start_pull(url, pulled)
        try:
            def started() -> bool:
                # Past the header cluster, which a pull writes before downloading.
                return (part.exists() and part.stat().st_size > MiB) or proc.poll() is not None

            wait_for(started, 120, "the first downloaded chunks")
            assert proc.poll() is None, proc.communicate()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert not pulled.exists()
        have = part.stat().st_size
        assert MiB < have < size
        return have

    have = killed_part_way()
    res = json.loads(bootcache("cache", "pull", "--output", "json", url, pulled).stdout)
    assert res["resumed-from"] >= have and res["downloaded-bytes"] == size - res["resumed-from"]
    assert_qemu_check(pulled)
    run([QEMU_IMG, "compare", pulled, cache])
    assert leftovers(tmp_path) == []

    # A partial download damaged on disk (a torn write): the digest catches it,
    # the partial file is dropped, and the next pull starts over.
    pulled.unlink()
    have = killed_part_way()
    with open(part, "r+b") as f:
        f.seek(have - 1000)
        f.write(b"\xff" * 8)
    proc = bootcache("cache", "pull", url, pulled, check=False)
    assert proc.returncode == 1 and "digest" in proc.stderr.decode(), proc.stderr
    assert not pulled.exists()
    res = json.loads(bootcache("cache", "pull", "--output", "json", url, pulled).stdout)
    assert res["resumed-from"] == 0 and res["downloaded-bytes"] == size
    run([QEMU_IMG, "compare", pulled, cache])
    assert leftovers(tmp_path) == []


def test_pull_resumes_a_download_that_had_finished(tmp_path: Path, nginx: NginxServer) -> None:
    """A pull that died after its last byte (in the base check, say) left the
    whole artifact behind: the next one downloads nothing more, and still
    checks the digest of every kept byte before linking the cache."""
    make_base(tmp_path / "base.raw", 48 * MiB, seed=9)
    cache = big_warm_cache(tmp_path, "base.raw")
    art = nginx.root / "boot.qcow2"
    bootcache("cache", "publish", cache, art)
    size = art.stat().st_size
    url = nginx.url("boot.qcow2")
    pulled = tmp_path / "pulled.qcow2"
    part = tmp_path / ".pulled.qcow2.pull"
    part.write_bytes(art.read_bytes())
    res = json.loads(bootcache("cache", "pull", "--output", "json", url, pulled).stdout)
    assert res["resumed-from"] == size and res["downloaded-bytes"] == 0, res
    run([QEMU_IMG, "compare", pulled, cache])
    assert leftovers(tmp_path) == []

    # The same, with a byte of the kept download damaged: refused by the digest.
    pulled.unlink()
    damaged = bytearray(art.read_bytes())
    damaged[size - 4096] ^= 0xFF
    part.write_bytes(bytes(damaged))
    proc = bootcache("cache", "pull", url, pulled, check=False)
    assert proc.returncode == 1 and "digest" in proc.stderr.decode(), proc.stderr
    assert not pulled.exists() and leftovers(tmp_path) == []
