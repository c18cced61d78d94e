"""Make the published-cache test vector of docs/spec/cache-image.md (section 13).

    python docs/spec/vectors/published/make_published_vector.py [FOLDER]

Publishes ../filled-lru.qcow2 (made by make_vectors.py) as
FOLDER/published.qcow2 (default: this folder) and writes published.json with
the fields a reader following section 13 decodes, found here with struct,
straight from the spec's tables. Deterministic for a
given zstd library (zstandard 0.25.0, level 3): running it again gives the
same bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from bootcache.publish.publish import publish

EXT_DIGEST = 0x42435044
DIGEST = struct.Struct(">IIQQ32s32s")  # section 13, bytes 0 - 87


def extensions(raw: bytes) -> list[tuple[int, bytes]]:
    pos = struct.unpack_from(">I", raw, 100)[0]
    out = []
    while True:
        etype, length = struct.unpack_from(">II", raw, pos)
        if etype == 0:
            return out
        out.append((etype, raw[pos + 8:pos + 8 + length]))
        pos += 8 + (length + 7) // 8 * 8


def data_clusters(raw: bytes) -> list[dict[str, Any]]:
    cluster_bits = struct.unpack_from(">I", raw, 20)[0]
    l1_size, l1_offset = struct.unpack_from(">IQ", raw, 36)
    x = 62 - (cluster_bits - 8)
    out = []
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", raw, l1_offset + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        for j in range((1 << cluster_bits) // 8):
            e = struct.unpack_from(">Q", raw, l2 + 8 * j)[0]
            if not e:
                continue
            guest = ((i << (cluster_bits - 3)) + j) << cluster_bits
            if e >> 62 & 1:
                out.append({"guest_offset": guest, "stored": "compressed",
                            "host_offset": e & ((1 << x) - 1),
                            "sectors": ((e >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1})
            else:
                out.append({"guest_offset": guest, "stored": "standard",
                            "host_offset": e & 0x00FFFFFFFFFFFE00})
    return out


def main(out: Path) -> None:
    art = out / "published.qcow2"
    source = Path(os.path.dirname(os.path.abspath(__file__))).parent / "filled-lru.qcow2"
    asyncio.run(publish(str(source), str(art), level=3, threads=1))
    raw = art.read_bytes()
    exts = extensions(raw)
    digest = dict(exts)[EXT_DIGEST]
    version, flags, length, clusters, file_sha, content_sha = DIGEST.unpack_from(digest)
    at = raw.index(digest) + 24
    facts = {
        "description": "filled-lru.qcow2 published: zstd compressed clusters, the cache's "
                       "extensions copied, the digest extension last.",
        "file_length": len(raw),
        "compression_type": raw[104],
        "autoclear_features": struct.unpack_from(">Q", raw, 88)[0],
        "extension_types": [f"{t:#010x}" for t, _ in exts],
        "digest": {"length": len(digest), "version": version, "flags": flags,
                   "file_length": length, "data_clusters": clusters,
                   "file_sha256": file_sha.hex(), "file_sha256_offset": at,
                   "content_sha256": content_sha.hex()},
        "data_clusters": data_clusters(raw),
    }
    (out / "published.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.path.dirname(__file__)))
