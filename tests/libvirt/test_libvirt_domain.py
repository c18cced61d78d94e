"""contrib/libvirt/domain-nbd-cache.xml under a real libvirtd: a guest whose
overlay is backed by a ``bootcache serve`` export reads the base's bytes
through the cache.

libvirtd: an already running one (systemd or someone else's) is used as it is.
Otherwise this starts virtlogd and libvirtd itself, libvirtd in a private mount
namespace where /etc/libvirt/qemu.conf is a test copy running QEMU as root:
QEMU as libvirt-qemu could not open the 0600 root socket, and with /dev/kvm
0600 root every domain start would re-probe QEMU for ~50 s.  Nothing on the
machine's own config changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "contrib" / "libvirt" / "domain-nbd-cache.xml"
URI = "qemu:///system"
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
TOOLS = ("libvirtd", "virtlogd", "virsh", "virt-xml-validate", "qemu-img", "qemu-system-x86_64")

MiB = 1 << 20
SIZE = 16 * MiB


def pattern_at(offset: int) -> int:
    """The byte the base holds at ``offset``: a different one per MiB, so a
    read that lands at the wrong place fails the pattern check."""
    return 0x40 + offset // MiB


def wait_until(what: str, check: Callable[[], Any], timeout: float,
               alive: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``
    or as soon as ``alive`` (the process expected to bring it about) exits."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _connects(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def virsh(*args: str, check: bool = True, timeout: float = 120) -> str:
    res = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def _libvirtd_answers() -> bool:
    if not os.path.exists(LIBVIRT_SOCK):
        return False
    res = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=60)
    return res.returncode == 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@dataclass
class Libvirtd:
    # QEMU runs as root: a 0600 socket of ours is enough.  False for a
    # libvirtd we did not start (its QEMU may be libvirt-qemu).
    qemu_is_root: bool


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (see .ci/install-deps)")
    if os.geteuid() != 0:
        pytest.skip("qemu:///system needs root")
    if _libvirtd_answers():
        yield Libvirtd(qemu_is_root=False)
        return
    if os.path.isdir("/run/systemd/system"):
        # systemd is PID 1: let it start the distribution's units.
        res = subprocess.run(["systemctl", "start", "virtlogd.socket", "libvirtd.service"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not _libvirtd_answers():
            pytest.skip(f"systemctl cannot start libvirtd: {res.stderr.strip()}")
        yield Libvirtd(qemu_is_root=False)
        return

    workdir = Path(tempfile.mkdtemp(prefix="libvirtd.", dir="/tmp"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not _connects(VIRTLOGD_SOCK):
            # Foreground rather than -d: we keep the PID to stop exactly it.
            log = open(workdir / "virtlogd.log", "wb")  # noqa: SIM115 (lives as long as it)
            virtlogd = subprocess.Popen(["virtlogd"], stdout=log, stderr=log,
                                        start_new_session=True)
            started.append(virtlogd)
            try:
                wait_until("virtlogd socket", lambda: _connects(VIRTLOGD_SOCK), 60, virtlogd)
            except (RuntimeError, TimeoutError) as e:
                pytest.skip(f"virtlogd cannot start: {e}: {_log_tail(workdir / 'virtlogd.log')}")
        conf = workdir / "qemu.conf"
        conf.write_text('user = "root"\ngroup = "root"\n')
        private = f"mount --bind {conf} /etc/libvirt/qemu.conf && exec libvirtd"
        attempts = [
            # QEMU as root, the machine's config untouched.
            (["unshare", "--mount", "--propagation", "private", "sh", "-c", private], True),
            # No mount namespaces here: the system config, QEMU as its user.
            (["libvirtd"], False),
        ]
        failures = []
        qemu_is_root = False
        for cmd, as_root in attempts:
            logpath = workdir / f"libvirtd.{len(failures)}.log"
            log = open(logpath, "wb")  # noqa: SIM115 (lives as long as the daemon)
            daemon = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
            started.append(daemon)
            try:
                # The first start probes QEMU's capabilities (seconds); later
                # ones read them from /var/cache/libvirt.
                wait_until("libvirtd", _libvirtd_answers, 180, daemon)
                qemu_is_root = as_root
                break
            except (RuntimeError, TimeoutError) as e:
                _stop(daemon)
                started.remove(daemon)
                failures.append(f"{cmd[0]}: {e}: {_log_tail(logpath)}")
        else:
            pytest.skip("libvirtd cannot start here: " + " | ".join(failures))
        yield Libvirtd(qemu_is_root=qemu_is_root)
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def bootcache(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "bootcache", *args], capture_output=True,
                         text=True, env=child_env(), timeout=120)
    assert res.returncode == 0, f"bootcache {' '.join(args)}: {res.stderr}"
    return res.stdout


@contextlib.contextmanager
def serving(cache: Path, export: str, sock: Path, mode: str) -> Iterator[None]:
    """``bootcache serve`` until the block ends; ready once it says it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "bootcache", "serve", "--socket", str(sock),
                             "--socket-mode", mode, f"{cache}={export}"],
                            stderr=subprocess.PIPE, env=child_env())
    assert proc.stderr is not None
    try:
        err = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while b"serving" not in err:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"bootcache serve not ready: {err.decode()}")
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"bootcache serve exited: {err.decode()}")
                err += chunk
        assert sock.is_socket()
        yield
    finally:
        _stop(proc)


def render(replacements: dict[str, str]) -> str:
    """The example with its sample values replaced; each must occur exactly
    once, so the test notices when the example changes under it."""
    xml = EXAMPLE.read_text()
    for old, new in replacements.items():
        assert xml.count(old) == 1, f"{old!r} occurs {xml.count(old)} times in {EXAMPLE.name}"
        xml = xml.replace(old, new)
    return xml


def stats(cache: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bootcache("cache", "stats", "--output", "json", str(cache)))
    return data


def qemu_io_read(domain: str, node: str, log: Path, offset: int, byte: int) -> str:
    """Run ``qemu-io read -P`` in the guest's QEMU; return its verdict line.

    HMP qemu-io prints to QEMU's stdout, which libvirt sends (via virtlogd) to
    the domain log, not back over the monitor: wait for the line there."""
    virsh("qemu-monitor-command", "--hmp", domain,
          f'qemu-io {node} "read -P 0x{byte:02x} {offset} 64k"')
    done = f"read 65536/65536 bytes at offset {offset}"
    failed = f"Pattern verification failed at offset {offset},"

    def verdict() -> str | None:
        text = log.read_text(errors="replace")
        if failed in text:
            return "mismatch"
        return "match" if done in text else None

    # Both lines are printed by one command, the failure one first.
    result: str = wait_until(f"qemu-io read at {offset} in {log}", verdict, 60)
    return result


def test_domain_reads_through_bootcache_export(libvirtd: Libvirtd) -> None:
    work = Path(tempfile.mkdtemp(prefix="lv.", dir="/tmp"))  # short: socket path
    domain = f"bootcache-test-{os.getpid()}"
    log = QEMU_LOG_DIR / f"{domain}.log"
    try:
        if not libvirtd.qemu_is_root:
            # QEMU may run as another user: let it reach the directory and socket.
            work.chmod(0o755)
        base = work / "base.raw"
        with open(base, "wb") as f:
            for off in range(0, SIZE, MiB):
                f.write(bytes([pattern_at(off)]) * MiB)
        cache = work / "cache.qcow2"
        bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", str(base),
                  "-F", "raw", str(cache), str(SIZE))
        sock = work / "bc.sock"
        export = "node-base"
        mode = "0600" if libvirtd.qemu_is_root else "0666"
        with serving(cache, export, sock, mode):
            overlay = work / "vm.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            f"nbd+unix:///{export}?socket={sock}", str(overlay)],
                           check=True, timeout=60)
            xml = work / "domain.xml"
            xml.write_text(render({
                "<name>bootcache-demo</name>": f"<name>{domain}</name>",
                "file='/var/lib/libvirt/images/bootcache-demo.qcow2'": f"file='{overlay}'",
                "name='debian-12'": f"name='{export}'",
                "socket='/run/bootcache/bootcache.sock'": f"socket='{sock}'",
            }))
            res = subprocess.run(["virt-xml-validate", str(xml), "domain"],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr

            # libvirt appends to a domain's log; start from an empty one.
            with contextlib.suppress(FileNotFoundError):
                log.unlink()
            virsh("define", str(xml))
            try:
                virsh("start", domain)
                wait_until(f"{domain} running",
                           lambda: virsh("domstate", domain).strip() == "running", 60)
                check_reads(domain, log, cache, sock, export)
            finally:
                virsh("destroy", domain, check=False)
                virsh("undefine", domain, check=False)
    finally:
        with contextlib.suppress(OSError):
            log.unlink()
        shutil.rmtree(work, ignore_errors=True)


def check_reads(domain: str, log: Path, cache: Path, sock: Path, export: str) -> None:
    blocks = json.loads(virsh("qemu-monitor-command", domain,
                              '{"execute": "query-named-block-nodes",'
                              ' "arguments": {"flat": true}}'))["return"]
    # libvirt built the chain from the XML: the overlay over an NBD node on our socket.
    nbd = [b for b in blocks if b["drv"] == "nbd"]
    assert [b["file"] for b in nbd] == [f"nbd+unix:///{export}?socket={sock}"], blocks
    top = [b for b in blocks if b["drv"] == "qcow2" and b["file"].endswith("/vm.qcow2")]
    assert len(top) == 1, blocks
    node = top[0]["node-name"]

    before = stats(cache)
    # The overlay is empty: these bytes can only come from the base, through
    # the export.  Offsets past the first MiB, which firmware does not read.
    offsets = [3 * MiB, 7 * MiB + 64 * 1024, 15 * MiB]
    for off in offsets:
        assert qemu_io_read(domain, node, log, off, pattern_at(off)) == "match"
    # The check can fail: a wrong pattern is caught.
    assert qemu_io_read(domain, node, log, 5 * MiB, pattern_at(5 * MiB) ^ 0xFF) == "mismatch"

    # The daemon publishes live counters about once a second.
    wanted = before["bytes_from_base"] + (len(offsets) + 1) * 65536
    after = wait_until("cache stats to count the reads",
                       lambda: (s := stats(cache))["bytes_from_base"] >= wanted and s, 30)
    assert after["misses"] >= before["misses"] + len(offsets) + 1
    assert after["clusters_stored"] >= before["clusters_stored"] + len(offsets) + 1
