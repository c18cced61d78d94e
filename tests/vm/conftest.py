"""Real peers for the hot-plug tests: a diskless QEMU and a ``bootcache serve``.

The VM is q35 with one PCIe root port (``rp1``) to plug into, ACPI PCI
hot-plug off so the port's native hot-plug applies, and two QMP sockets:
``qmp.sock`` for the ``bootcache vm`` commands under test and
``observer.sock`` for the test's own queries and events (QEMU serves one
client per QMP socket at a time). ``qemu-io`` run through HMP prints to
QEMU's stdout, so its results are read from the VM's log.

The daemon serves one cache image over a raw base whose 64 KiB cluster k
is filled with the byte ``k % 251 + 1``, so ``read -P`` can check any range.

Import the plain helpers with ``from .conftest import ...``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = shutil.which("qemu-system-x86_64")
KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
BASE_SIZE = 4 * MiB
EXPORT = "vmdisk"
START_TIMEOUT = 30.0
QMP_TIMEOUT = 60.0  # a qemu-io read waiting on an NBD reconnect holds the monitor


def pattern_of(cluster: int) -> int:
    return cluster % 251 + 1


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true; that value."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        time.sleep(0.02)


def bootcache(*args: str | os.PathLike[str],
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """The ``bootcache`` CLI of this interpreter."""
    argv = [sys.executable, "-m", "bootcache", *map(os.fspath, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}")
    return proc


def cache_stats(cache: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(bootcache("cache", "stats", "--output", "json",
                                                 cache).stdout)
    return stats


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Daemon:
    """``bootcache serve --socket S cache.qcow2=EXPORT``, restartable."""

    def __init__(self, cache: Path, socket: Path, log: Path) -> None:
        self.cache = cache
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bootcache", "serve", "--socket", str(self.socket),
                 f"{self.cache}={EXPORT}"], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        proc = self.proc
        wait_for(lambda: self.socket.is_socket() or proc.poll() is not None, START_TIMEOUT,
                 "bootcache serve's socket")
        assert proc.poll() is None, f"bootcache serve exited:\n{self.log.read_text()}"

    def stop(self) -> None:
        """SIGTERM, as a service manager restarting it would send."""
        if self.proc is not None:
            rc = stop_process(self.proc)
            assert rc == 0, f"bootcache serve exited {rc}:\n{self.log.read_text()}"


class Vm:
    """A diskless q35 QEMU with a hot-plug root port and two QMP sockets."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.qmp_socket = workdir / f"{name}.qmp"
        self.observer_socket = workdir / f"{name}.obs"
        self.log = workdir / f"{name}.log"
        assert QEMU is not None
        argv = [QEMU, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                "-qmp", f"unix:{self.observer_socket},server=on,wait=off",
                "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                "-device", "pcie-root-port,id=rp1,chassis=1"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        proc = self.proc
        wait_for(lambda: (self.qmp_socket.is_socket() and self.observer_socket.is_socket())
                 or proc.poll() is not None, START_TIMEOUT, f"{name}'s QMP sockets")
        assert proc.poll() is None, f"QEMU exited:\n{self.log.read_text()}"
        self.monitor = QEMUMonitorProtocol(str(self.observer_socket), nickname=name)
        self.monitor.connect()  # returns once QMP has answered the handshake
        self.monitor.settimeout(QMP_TIMEOUT)

    def qmp(self, command: str, **args: Any) -> Any:
        return self.monitor.cmd(command, **args)

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.qmp("query-named-block-nodes", flat=True)}

    def block_devices(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = self.qmp("query-block")
        return blocks

    def device_ids(self) -> set[str]:
        return {c["name"] for c in self.qmp("qom-list", path="/machine/peripheral")
                if c["type"].startswith("child<")}

    def state(self) -> tuple[set[str], set[str], int]:
        """What a refused hot-plug must leave as it was."""
        return self.node_names(), self.device_ids(), len(self.block_devices())

    def read_clusters(self, node: str, clusters: list[int]) -> None:
        """``qemu-io NODE "read -P ..."`` per cluster; each must match the base."""
        for k in clusters:
            self.qemu_io(node, f"read -P {pattern_of(k):#x} {k * CLUSTER} {CLUSTER}",
                         expect=f"read {CLUSTER}/{CLUSTER} bytes at offset {k * CLUSTER}")

    def qemu_io(self, node: str, command: str, *, expect: str) -> None:
        start = self.log.stat().st_size
        reply = self.qmp("human-monitor-command",
                         **{"command-line": f'qemu-io {node} "{command}"'})
        assert not reply.strip(), f"qemu-io {node} {command!r}: {reply}"

        def output() -> str | None:
            with open(self.log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            done = expect in text or "fail" in text.lower() or "error" in text.lower()
            return text if done else None

        text = wait_for(output, 10, f"qemu-io {command!r} output in {self.log}")
        assert expect in text and "fail" not in text.lower() and "error" not in text.lower(), (
            f"qemu-io {node} {command!r}:\n{text}")

    def clear_events(self) -> None:
        self.monitor.clear_events()

    def wait_event(self, name: str, accept: Callable[[dict[str, Any]], bool],
                   timeout: float = 10) -> dict[str, Any]:
        """The first event ``name`` that ``accept`` takes, seen by the observer."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                event = self.monitor.pull_event(wait=left)
            except TimeoutError:
                break
            if event is not None and event["event"] == name and accept(event):
                return event
        raise TimeoutError(f"{self.name}: no matching {name} within {timeout:g} s")

    def stop(self) -> None:
        self.monitor.close()
        stop_process(self.proc)


def write_pattern_base(path: Path, size: int) -> None:
    path.write_bytes(b"".join(bytes([pattern_of(k)]) * CLUSTER for k in range(size // CLUSTER)))


def attach(vm: Vm, daemon: Daemon, overlay: Path, device_id: str, *extra: str,
           bus: str = "rp1", check: bool = True) -> subprocess.CompletedProcess[str]:
    return bootcache("vm", "attach", "--qmp", vm.qmp_socket, "--export", EXPORT,
                     "--socket", daemon.socket, "--overlay", overlay, "--id", device_id,
                     "--bus", bus, *extra, check=check)


def detach(vm: Vm, device_id: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return bootcache("vm", "detach", "--qmp", vm.qmp_socket, "--id", device_id, check=check)


ERROR_LINE = re.compile(r"^bootcache: \S.*", re.M)


def assert_clear_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1 with one ``bootcache: ...`` line naming the problem, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert ERROR_LINE.search(proc.stderr), proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bcvm", dir="/tmp"))  # short: socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    """A running daemon serving an empty cache over the pattern base."""
    write_pattern_base(workdir / "base.raw", BASE_SIZE)
    cache = workdir / "cache.qcow2"
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", "base.raw",
              "-F", "raw", cache, str(BASE_SIZE))
    d = Daemon(cache, workdir / "nbd.sock", workdir / "serve.log")
    d.start()
    yield d
    if d.proc is not None:
        stop_process(d.proc)


@pytest.fixture
def make_vm(workdir: Path) -> Iterator[Callable[[str], Vm]]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed (.ci/install-deps installs it)")
    vms: list[Vm] = []

    def make(name: str) -> Vm:
        vms.append(Vm(workdir, name))
        return vms[-1]

    yield make
    for vm in vms:
        vm.stop()
