"""A daemon restart the VM does not notice.

With a disk attached (reconnect-delay set), ``bootcache serve`` gets SIGTERM
and is started again on the same socket within the delay. QEMU's NBD node
reconnects by itself: reads keep returning the base's bytes, with no I/O
error, both after the restart and for a read sent while the daemon was down
(it waits for the reconnect instead of failing).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from .conftest import Daemon, Vm, attach, cache_stats

RECONNECT_DELAY = "20"


def test_reads_survive_a_daemon_restart(daemon: Daemon, make_vm: Any, workdir: Path) -> None:
    vm: Vm = make_vm("vm1")
    attach(vm, daemon, workdir / "vm1.qcow2", "disk1", "--reconnect-delay", RECONNECT_DELAY)
    vm.read_clusters("disk1-overlay", [0, 1, 2])

    # Restart, then read: cached clusters and new ones.
    daemon.stop()
    daemon.start()
    vm.read_clusters("disk1-overlay", [0, 1, 2, 20, 21])

    # Stop, and send a read while nothing listens; the restart happens meanwhile.
    daemon.stop()
    started = threading.Event()
    failure: list[BaseException] = []

    def restart_once_the_read_is_sent() -> None:
        try:
            started.wait(30)
            daemon.start()
        except BaseException as e:
            failure.append(e)

    restarter = threading.Thread(target=restart_once_the_read_is_sent)
    restarter.start()
    try:
        started.set()
        vm.read_clusters("disk1-overlay", [33])  # the monitor waits on the reconnect
    finally:
        restarter.join(60)
    assert not failure, failure
    vm.read_clusters("disk1-overlay", [0, 33, 34, 63])
    # The counters the restarted daemon publishes belong to the same cache.
    assert cache_stats(daemon.cache)["used_bytes"] > 0


def test_reads_survive_a_daemon_killed_mid_fill(daemon: Daemon, make_vm: Any,
                                                workdir: Path) -> None:
    """SIGKILL, not SIGTERM: the daemon dies with stores in flight. The VM's
    disk reconnects to the restarted daemon and reads the base's bytes; what
    the killed daemon leaked is reclaimed, so the cache ends clean."""
    vm: Vm = make_vm("vm1")
    attach(vm, daemon, workdir / "vm1.qcow2", "disk1", "--reconnect-delay", RECONNECT_DELAY)
    vm.read_clusters("disk1-overlay", list(range(0, 32)))  # cold: stores run behind
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.socket.unlink()  # a killed daemon leaves its socket behind
    daemon.start()
    vm.read_clusters("disk1-overlay", [0, 5, 31, 32, 40, 63])
    daemon.stop()
    proc = subprocess.run(["qemu-img", "check", "-U", str(daemon.cache)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # no leaks left either
