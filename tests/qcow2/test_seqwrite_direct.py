"""The sequential writer around the page cache (O_DIRECT, as pull writes a
cache) lays down the same bytes as through it, and qemu-img accepts them."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from bootcache.qcow2 import format as fmt
from bootcache.qcow2 import seqwrite

CLUSTER_BITS = 16
CS = 1 << CLUSTER_BITS


def _write(path: Path, clusters: list[int], payloads: list[bytes], direct: bool) -> None:
    header = fmt.Header(version=3, cluster_bits=CLUSTER_BITS, size=1 << 30, l1_size=0,
                        l1_table_offset=0, refcount_table_offset=0,
                        refcount_table_clusters=0, refcount_order=4,
                        header_length=fmt.OUR_V3_HEADER_LENGTH)
    layout = seqwrite.plan(header, clusters, [CS] * len(clusters), [False] * len(clusters))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    direct_fd = seqwrite.open_direct(str(path)) if direct else -1
    if direct:
        assert direct_fd >= 0, "this file system refuses O_DIRECT: the test proves nothing"
    try:
        writer = seqwrite.SequentialWriter(fd, layout, direct_fd=direct_fd)
        writer.write_metadata(seqwrite.metadata(layout))
        for p in payloads:
            writer.write_data(memoryview(p))
        writer.finish()
    finally:
        os.close(fd)
        if direct_fd >= 0:
            os.close(direct_fd)


def test_direct_and_buffered_writes_make_the_same_image(tmp_path: Path) -> None:
    rng = random.Random(7)
    # More than one staging buffer of data, in runs with gaps.
    clusters = sorted(rng.sample(range(16384), 150))
    payloads = [rng.randbytes(CS) for _ in clusters]
    _write(tmp_path / "buffered.qcow2", clusters, payloads, direct=False)
    _write(tmp_path / "direct.qcow2", clusters, payloads, direct=True)
    direct = (tmp_path / "direct.qcow2").read_bytes()
    assert direct == (tmp_path / "buffered.qcow2").read_bytes()
    assert len(direct) > 2 * (4 << 20)
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed")
    out = subprocess.run([qemu_img, "check", "--output", "json", tmp_path / "direct.qcow2"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["allocated-clusters"] == len(clusters)
    raw = tmp_path / "direct.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", tmp_path / "direct.qcow2", raw],
                   check=True)
    with open(raw, "rb") as f:
        for c, p in zip(clusters[::17], payloads[::17], strict=True):
            f.seek(c * CS)
            assert f.read(CS) == p
