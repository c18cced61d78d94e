"""The published-cache vector of docs/spec/cache-image.md section 13: made again
byte for byte, decoded here independently of bootcache (struct, hashlib and
qemu-img as the reader of the guest content), accepted by qemu-img, and
refused by pull because its recorded base identity names no real file."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

from cache.conftest import REPO

from .conftest import QEMU_IMG, bootcache, child_env, run

VECTORS = REPO / "docs" / "spec" / "vectors"
PUBLISHED = VECTORS / "published"
EXT_DIGEST = 0x42435044


def test_vector_is_reproducible(tmp_path: Path) -> None:
    run([sys.executable, PUBLISHED / "make_published_vector.py", tmp_path], env=child_env())
    assert (tmp_path / "published.qcow2").read_bytes() == \
        (PUBLISHED / "published.qcow2").read_bytes()
    assert json.loads((tmp_path / "published.json").read_text()) == \
        json.loads((PUBLISHED / "published.json").read_text())


def test_vector_decodes_as_the_spec_says(tmp_path: Path) -> None:
    raw = (PUBLISHED / "published.qcow2").read_bytes()
    want = json.loads((PUBLISHED / "published.json").read_text())
    assert len(raw) == want["file_length"] == want["digest"]["file_length"]
    # The digest extension, found by walking the header extensions.
    pos = struct.unpack_from(">I", raw, 100)[0]
    found = None
    while True:
        etype, length = struct.unpack_from(">II", raw, pos)
        if etype == 0:
            break
        if etype == EXT_DIGEST:
            found = (pos + 8, raw[pos + 8:pos + 8 + length])
        pos += 8 + (length + 7) // 8 * 8
    assert found is not None
    at, data = found
    version, flags, length, clusters, file_sha, content_sha = struct.unpack(">IIQQ32s32s", data)
    assert (version, flags, length, clusters) == (1, 1, len(raw), 4)
    # flags bit 0: every compressed cluster is a zstd frame with a content
    # checksum (its frame header descriptor's bit 2).
    for dc in want["data_clusters"]:
        if dc["stored"] == "compressed":
            frame = raw[dc["host_offset"]:]
            assert frame[:4] == b"\x28\xb5\x2f\xfd" and frame[4] & 0x04
    assert at + 24 == want["digest"]["file_sha256_offset"]
    # file_sha256: the whole file, its own 32 bytes read as zeros.
    zeroed = raw[:at + 24] + bytes(32) + raw[at + 56:]
    assert hashlib.sha256(zeroed).digest() == file_sha
    assert file_sha.hex() == want["digest"]["file_sha256"]
    # content_sha256: guest offset and cluster content of each data cluster, in
    # guest order, with QEMU as the reader of the compressed clusters.
    shutil.copy(PUBLISHED / "published.qcow2", tmp_path)
    shutil.copy(VECTORS / "base.qcow2", tmp_path)  # its base, named relatively
    run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", tmp_path / "published.qcow2",
         tmp_path / "guest.raw"])
    guest = (tmp_path / "guest.raw").read_bytes()
    h = hashlib.sha256()
    for dc in want["data_clusters"]:
        off = dc["guest_offset"]
        h.update(off.to_bytes(8, "big") + guest[off:off + 4096])
    assert h.digest() == content_sha and content_sha.hex() == want["digest"]["content_sha256"]
    mapped = json.loads(run([QEMU_IMG, "map", "--output", "json",
                             tmp_path / "published.qcow2"]).stdout)
    own = [off for m in mapped if m["depth"] == 0 and m["data"]
           for off in range(m["start"], m["start"] + m["length"], 4096)]
    assert own == [dc["guest_offset"] for dc in want["data_clusters"]]
    report = json.loads(run([QEMU_IMG, "check", "--output", "json",
                             tmp_path / "published.qcow2"]).stdout)
    assert report["compressed-clusters"] == 4 and report.get("corruptions", 0) == 0


def test_pull_refuses_the_vector_whose_base_identity_is_invented(tmp_path: Path) -> None:
    shutil.copy(PUBLISHED / "published.qcow2", tmp_path)
    shutil.copy(VECTORS / "base.qcow2", tmp_path)
    proc = bootcache("cache", "pull", tmp_path / "published.qcow2", tmp_path / "c.qcow2",
                     check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "another base" in err and "inode" in err, err
    assert not (tmp_path / "c.qcow2").exists()

