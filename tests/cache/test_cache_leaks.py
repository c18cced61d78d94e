"""A cache reclaims what a crash leaked, when its owner opens it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import bootcache

from .conftest import MiB, assert_qemu_check, create_cache, make_base

FILL = textwrap.dedent("""
    import os, signal, sys
    import bootcache
    img = bootcache.open(sys.argv[1])
    img.read(0, 4 << 20)          # stored, but not flushed: leaks after a kill
    os.kill(os.getpid(), signal.SIGKILL)
""")


def qemu_check_json(image: Path) -> dict[str, object]:
    import json
    out = subprocess.run(["qemu-img", "check", "--output", "json", str(image)],
                         capture_output=True, text=True, check=False)
    assert out.returncode in (0, 3), out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_leaks_from_a_killed_filler_are_reclaimed_at_open(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", 8 * MiB, seed=91)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    proc = subprocess.run([sys.executable, "-c", FILL, str(cache)], check=False)
    assert proc.returncode == -signal.SIGKILL
    leaked = qemu_check_json(cache).get("leaks", 0)
    assert isinstance(leaked, int) and leaked > 0, "the kill left no leaks to reclaim"
    with bootcache.open(str(cache)) as img:
        assert img.read(0, len(base)) == base
    assert "leaks" not in qemu_check_json(cache)
    assert_qemu_check(cache)
    assert os.path.getsize(cache) < 16 * MiB
