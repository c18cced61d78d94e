"""The product's path end to end with real clients: ``bootcache serve``
exports a cache image over NBD; QEMU overlays (vm-N.qcow2 whose backing file
is the export) and qemu-io read through it. The cache fills once, is exported
read-only, and a VM's writes stay in its overlay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    CLUSTER,
    QEMU_IMG,
    QEMU_IO,
    MiB,
    assert_bytes,
    assert_qemu_check,
    cache_stats,
    cached_bytes,
    child_env,
    create_cache,
    make_base,
    qemu_convert_raw,
    run,
    wait_for,
)


@pytest.fixture
def served(tmp_path: Path, sockdir: str) -> Iterator[tuple[str, Path, bytes]]:
    base = make_base(tmp_path / "base.raw", 4 * MiB, seed=91)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    sock = os.path.join(sockdir, "bc.sock")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "bootcache", "serve", "--socket", sock,
                             f"{cache}=cache"], stdout=log, stderr=subprocess.STDOUT,
                            env=child_env())
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 15, "bootcache serve")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        yield f"nbd+unix:///cache?socket={sock}", cache, base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_vms_boot_through_the_served_cache(tmp_path: Path,
                                           served: tuple[str, Path, bytes]) -> None:
    uri, _, base = served
    vms = []
    for n in range(3):
        vm = tmp_path / f"vm{n}.qcow2"
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", vm])
        vms.append(vm)
    assert_bytes(qemu_convert_raw(vms[0]), base, "vm0 reads the base through the cache")
    # A VM writes: its overlay takes it, the cache does not.
    run([QEMU_IO, "-f", "qcow2", "-c", f"write -P 0x5a {CLUSTER} 4096", vms[1]])
    expected = bytearray(base)
    expected[CLUSTER:CLUSTER + 4096] = b"\x5a" * 4096
    assert_bytes(qemu_convert_raw(vms[1]), bytes(expected), "vm1 sees its own write")
    assert_bytes(qemu_convert_raw(vms[2]), base, "vm2 does not")
    # The export is read-only: a client writing straight to it is refused.
    proc = run([QEMU_IO, "-f", "raw", "-c", "write -P 0x11 0 512", uri], check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace").lower()
    assert proc.returncode != 0 or "fail" in out or "read-only" in out or "permission" in out, out
    proc = run([QEMU_IO, "-r", "-f", "raw", "-c", f"read -P {base[0]:#x} 0 1", uri],
               check=False)
    assert proc.returncode == 0 and b"fail" not in proc.stdout.lower(), proc.stdout


def test_served_cache_state_after_shutdown(tmp_path: Path, sockdir: str) -> None:
    base = make_base(tmp_path / "base.raw", 2 * MiB, seed=92)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    sock = os.path.join(sockdir, "bc.sock")
    proc = subprocess.Popen([sys.executable, "-m", "bootcache", "serve", "--socket", sock,
                             f"{cache}=cache"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=child_env())
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 15, "serve")
        uri = f"nbd+unix:///cache?socket={sock}"
        for n in range(3):
            vm = tmp_path / f"vm{n}.qcow2"
            run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", vm])
            assert_bytes(qemu_convert_raw(vm), base, f"vm{n}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    stats = cache_stats(cache)
    assert stats["bytes_from_base"] == len(base), f"three VMs cost more than one base: {stats}"
    assert cached_bytes(cache) == len(base)
    assert_qemu_check(cache)
