"""Hostile metadata that the fuzzer cannot judge: writes must never land on metadata.

An L2 entry redirected onto a metadata cluster (header, L1 table, L2 table,
refcount table, refcount block) must make bootcache refuse the write (QEMU's
overlap check marks such an image corrupt) instead of overwriting metadata.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bootcache
from bootcache.errors import BootcacheError

from .conftest import MiB, qemu_img_create, run_qemu_io

COPIED = 1 << 63


def u64(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 8], "big")


def layout(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    l1 = u64(data, 40)
    rt = u64(data, 48)
    return {"header": 0, "l1": l1, "l2": u64(data, l1) & 0x00FFFFFFFFFFFE00, "rt": rt,
            "rb": u64(data, rt) & ~0x1FF}


@pytest.mark.parametrize("target", ["header", "l1", "l2", "rt", "rb"])
def test_write_through_l2_entry_pointing_at_metadata_is_refused(tmp_path: Path,
                                                                target: str) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 4 * MiB)
    run_qemu_io(img, ["write -q -P 0x61 0 64k", "write -q -P 0x62 64k 64k"])
    where = layout(img)
    l2 = where["l2"]
    # Guest cluster 1 now claims the target metadata cluster as its data.
    with open(img, "r+b") as f:
        f.seek(l2 + 8)
        f.write((COPIED | where[target]).to_bytes(8, "big"))
    before = img.read_bytes()
    meta = before[where[target]:where[target] + 65536]
    try:
        with bootcache.open(str(img), writable=True) as disk:
            disk.write(65536 + 100, b"\xff" * 4000)
            disk.flush()
    except BootcacheError:
        pass
    after = img.read_bytes()
    got = after[where[target]:where[target] + 65536][:100]
    if target == "header":
        # Marking the image corrupt (incompatible feature bit 1) is the one
        # header change allowed, as QEMU makes it too.
        assert after[72:80] in (meta[72:80], (int.from_bytes(meta[72:80], "big") | 2)
                                .to_bytes(8, "big"))
        got, meta = got[:72] + got[80:], meta[:72] + meta[80:]
    assert got == meta[:len(got)], f"bootcache wrote guest data over the {target} cluster"
    assert after[where[target] + 100:where[target] + 4100] != b"\xff" * 4000, \
        f"bootcache wrote guest data over the {target} cluster"
