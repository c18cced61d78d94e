"""``bootcache vm attach/detach`` against a running QEMU and a running daemon.

A disk attached by QMP reads the base's bytes, through the cache (the
daemon's live counters move), from one or two VMs at once; detach leaves no
device and no block node behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import (
    BASE_SIZE,
    CLUSTER,
    Daemon,
    Vm,
    attach,
    bootcache,
    cache_stats,
    detach,
    wait_for,
)


def stats_when(daemon: Daemon, ready: Any, what: str) -> dict[str, Any]:
    """The daemon's live counters once ``ready(stats)`` holds (published each second)."""
    def current() -> dict[str, Any] | None:
        stats = cache_stats(daemon.cache)
        return stats if ready(stats) else None
    result: dict[str, Any] = wait_for(current, 10, what)
    return result


def through_cache(stats: dict[str, Any]) -> int:
    return int(stats["bytes_from_base"]) + int(stats["bytes_from_cache"])


def test_attach_reads_the_base_through_the_cache(daemon: Daemon, make_vm: Any,
                                                 workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    overlay = workdir / "vm1.qcow2"
    proc = attach(vm, daemon, overlay, "disk1")
    assert "attached disk1" in proc.stderr
    assert overlay.exists(), "attach did not create the overlay"
    assert {"disk1-nbd", "disk1-file", "disk1-overlay"} <= vm.node_names()
    assert "disk1" in vm.device_ids()
    [block] = [b for b in vm.block_devices()
               if b.get("inserted", {}).get("node-name") == "disk1-overlay"]
    assert block["qdev"] == "/machine/peripheral/disk1/virtio-backend"
    assert block["inserted"]["backing_file_depth"] == 1
    before = cache_stats(daemon.cache)

    clusters = [0, 1, 7, 30, 63]
    vm.read_clusters("disk1-overlay", clusters)
    # Every byte read passed through the cache, and the new ones came from the base.
    cold = stats_when(daemon, lambda s: through_cache(s) >= through_cache(before)
                      + len(clusters) * CLUSTER, "the reads in the live stats")
    assert cold["misses"] > before["misses"]
    assert cold["bytes_from_base"] > before["bytes_from_base"]

    # Again: now the cache answers and the base is not asked.
    vm.read_clusters("disk1-overlay", clusters)
    warm = stats_when(daemon, lambda s: s["hits"] >= cold["hits"] + len(clusters),
                      "the hits in the live stats")
    assert warm["bytes_from_base"] == cold["bytes_from_base"]
    assert warm["bytes_from_cache"] > cold["bytes_from_cache"]

    # Last: `bootcache info` opens the overlay's backing, and so reads the export too.
    info = json.loads(bootcache("info", "-U", "--output", "json", overlay).stdout)
    assert info["backing-filename"] == f"nbd+unix:///vmdisk?socket={daemon.socket}"
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == BASE_SIZE


def test_two_vms_share_one_cache_export(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    vms: list[Vm] = [make_vm("vm1"), make_vm("vm2")]
    for n, vm in enumerate(vms, 1):
        attach(vm, daemon, workdir / f"vm{n}.qcow2", "disk")
    clusters = [2, 3, 40, 41]
    vms[0].read_clusters("disk-overlay", clusters)
    first = stats_when(daemon, lambda s: s["bytes_from_base"] >= len(clusters) * CLUSTER,
                       "the first VM's misses")
    vms[1].read_clusters("disk-overlay", clusters)
    second = stats_when(daemon, lambda s: s["hits"] >= first["hits"] + len(clusters),
                        "the second VM's hits")
    assert second["bytes_from_base"] == first["bytes_from_base"], (
        "the second VM's reads went to the base instead of the cache")
    # Each VM still reads clusters the other never asked for.
    vms[1].read_clusters("disk-overlay", [50])
    vms[0].read_clusters("disk-overlay", [51])


def test_detach_removes_device_and_nodes(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    nodes_before = vm.node_names()
    blocks_before = len(vm.block_devices())
    attach(vm, daemon, workdir / "vm1.qcow2", "disk1")
    vm.read_clusters("disk1-overlay", [5])
    vm.clear_events()

    proc = detach(vm, "disk1")
    assert "detached disk1" in proc.stderr
    # The command waited for it; the observer sees the same event.
    vm.wait_event("DEVICE_DELETED", lambda e: e["data"].get("device") == "disk1")
    assert "disk1" not in vm.device_ids()
    assert len(vm.block_devices()) == blocks_before
    assert not any(b.get("qdev", "").find("disk1") >= 0 for b in vm.block_devices())
    assert vm.node_names() == nodes_before
    assert not {"disk1-nbd", "disk1-file", "disk1-overlay"} & vm.node_names()

    # The id is free again: the same overlay plugs back in and reads.
    attach(vm, daemon, workdir / "vm1.qcow2", "disk1")
    vm.read_clusters("disk1-overlay", [6])
    detach(vm, "disk1")
    assert vm.node_names() == nodes_before


def test_help_does_not_load_the_qmp_library() -> None:
    # `bootcache --help` lists `vm`; only running a vm command imports qemu.qmp.
    code = ("import sys; from bootcache.cli.main import cli; "
            "cli.main(['--help'], standalone_mode=False); "
            "assert 'qemu.qmp' not in sys.modules, 'qemu.qmp imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert "attach" in bootcache("vm", "--help").stdout
