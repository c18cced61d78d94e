"""A refused ``bootcache vm attach/detach``: one clear error line, exit 1, and
the VM exactly as it was (same block nodes, devices and block backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conftest import Daemon, Vm, assert_clear_error, attach, bootcache, detach


def test_unknown_export(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    before = vm.state()
    overlay = workdir / "vm1.qcow2"
    proc = bootcache("vm", "attach", "--qmp", vm.qmp_socket, "--export", "no-such-export",
                     "--socket", daemon.socket, "--overlay", overlay, "--id", "disk1",
                     "--bus", "rp1", check=False)
    assert_clear_error(proc, "no-such-export")
    assert vm.state() == before
    assert not overlay.exists(), "an overlay was made for an export that does not exist"


def test_no_daemon_on_the_socket(make_vm: Any, workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    before = vm.state()
    proc = bootcache("vm", "attach", "--qmp", vm.qmp_socket, "--export", "x",
                     "--socket", workdir / "absent.sock", "--overlay", workdir / "o.qcow2",
                     "--id", "disk1", check=False)
    assert_clear_error(proc, "absent.sock", "bootcache serve")
    assert vm.state() == before


def test_qmp_socket_not_there(daemon: Daemon, workdir: Path) -> None:
    missing = workdir / "no-vm.qmp"
    proc = attach_to(missing, daemon, workdir / "vm1.qcow2", "disk1")
    assert_clear_error(proc, str(missing), "No such file")
    proc = bootcache("vm", "detach", "--qmp", missing, "--id", "disk1", check=False)
    assert_clear_error(proc, str(missing))
    assert not (workdir / "vm1.qcow2").exists()


def attach_to(qmp: Path, daemon: Daemon, overlay: Path, device_id: str) -> Any:
    return bootcache("vm", "attach", "--qmp", qmp, "--export", "vmdisk", "--socket",
                     daemon.socket, "--overlay", overlay, "--id", device_id, "--bus", "rp1",
                     check=False)


def test_id_in_use(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    attach(vm, daemon, workdir / "vm1.qcow2", "disk1")
    before = vm.state()
    second = workdir / "other.qcow2"
    proc = attach(vm, daemon, second, "disk1", check=False)
    assert_clear_error(proc, "disk1", "already exists")
    assert vm.state() == before
    assert not second.exists()
    vm.read_clusters("disk1-overlay", [3])  # the first disk is untouched

    # A node name taken by something else counts as in use too.
    vm.qmp("blockdev-add", driver="null-co", **{"node-name": "disk2-file"})
    before = vm.state()
    proc = attach(vm, daemon, second, "disk2", check=False)
    assert_clear_error(proc, "disk2-file", "already exist")
    assert vm.state() == before


def test_failure_midway_is_rolled_back(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    """No --bus on q35: device_add is refused after the three nodes were added."""
    vm: Vm = make_vm("vm1")
    before = vm.state()
    overlay = workdir / "vm1.qcow2"
    proc = bootcache("vm", "attach", "--qmp", vm.qmp_socket, "--export", "vmdisk",
                     "--socket", daemon.socket, "--overlay", overlay, "--id", "disk1",
                     check=False)
    assert_clear_error(proc, "device_add", "pcie-root-port")
    assert vm.state() == before
    assert not overlay.exists(), "the overlay made for the failed attach was left behind"

    # An overlay that was there before is kept: it may hold the VM's data.
    bootcache("create", "-q", "-f", "qcow2", overlay, "4M")
    proc = attach(vm, daemon, overlay, "disk1", bus="no-such-bus", check=False)
    assert_clear_error(proc, "no-such-bus")
    assert vm.state() == before
    assert overlay.exists()


def test_detach_unknown_id(make_vm: Any) -> None:
    vm: Vm = make_vm("vm1")
    before = vm.state()
    proc = detach(vm, "nothing-here", check=False)
    assert_clear_error(proc, "nothing-here")
    assert vm.state() == before
