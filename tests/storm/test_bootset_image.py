"""tools/bootset_image.py: a disk cut down to the clusters a trace reads, checked with qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bootset_image.py"
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
CLUSTER = 65536


@pytest.mark.parametrize("zstd", [False, True])
def test_keeps_exactly_the_clusters_the_trace_reads(tmp_path: Path, zstd: bool) -> None:
    disk = tmp_path / "disk.raw"
    data = os.urandom(4 << 20)
    disk.write_bytes(data)
    # Clusters 0, 1 (a read across their boundary), 5, and 63 (the last).
    reads = [(0, 512), (CLUSTER - 100, 200), (5 * CLUSTER + 4096, 4096), ((4 << 20) - 512, 512)]
    tr = tmp_path / "boot.trace"
    tr.write_text("".join(f"{i / 10} {off} {n}\n" for i, (off, n) in enumerate(reads)))
    out = tmp_path / "bootset.qcow2"
    argv = [sys.executable, str(TOOL), str(disk), str(tr), str(out)] + (["--zstd"] if zstd else [])
    res = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "4 blocks of 65536 bytes" in res.stdout

    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == len(data)
    assert info["cluster-size"] == CLUSTER
    mapping = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(out)],
                                        capture_output=True, text=True, check=True).stdout)
    allocated = {off // CLUSTER for e in mapping if e["data"]
                 for off in range(e["start"], e["start"] + e["length"], CLUSTER)}
    assert allocated == {0, 1, 5, 63}

    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(back)], check=True)
    got = back.read_bytes()
    for c in range(64):
        want = data[c * CLUSTER:(c + 1) * CLUSTER] if c in allocated else bytes(CLUSTER)
        assert got[c * CLUSTER:(c + 1) * CLUSTER] == want, f"cluster {c}"


def test_refuses_a_trace_reading_past_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(CLUSTER))
    tr = tmp_path / "boot.trace"
    tr.write_text(f"0 {CLUSTER} 512\n")
    out = tmp_path / "bootset.qcow2"
    res = subprocess.run([sys.executable, str(TOOL), str(disk), str(tr), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "not the disk it was recorded from" in res.stderr
    assert not out.exists()
