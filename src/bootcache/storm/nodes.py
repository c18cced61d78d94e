"""The processes of a boot storm: storage node, compute-node daemons, the link.

The "link" between compute and storage node is an nbdkit in front of the
storage data with the rate filter (the bandwidth of a shared network link)
and the log filter (which records every read that crossed it, so the bytes
over the link are counted exactly).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from bootcache.errors import BootcacheError
from bootcache.storm.trace import Trace

BLOCK = 64 * 1024
_READ_COUNT = re.compile(r" Read id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BootcacheError(f"{tool} is needed for the boot storm (Debian package: "
                             f"{'nbdkit' if tool == 'nbdkit' else tool})")
    return path


class SyntheticBase:
    """A sparse base image holding deterministic random data where the trace reads.

    Only the blocks the trace touches hold data (so a 4 GiB base costs 50 MB of
    disk); ``expected`` recomputes any range for checking replayed reads.
    """

    def __init__(self, path: str, trace: Trace, seed: int = 1) -> None:
        self.path = path
        self.seed = seed
        self.blocks = sorted(trace.blocks(BLOCK))
        self.block_set = set(self.blocks)
        end = trace.end
        self.size = max(-(-end // (1 << 30)) << 30, BLOCK)
        self._cache: dict[int, bytes] = {}

    def block(self, b: int) -> bytes:
        data = self._cache.get(b)
        if data is None:
            data = random.Random(self.seed * 1_000_003 + b).randbytes(BLOCK) \
                if b in self.block_set else bytes(BLOCK)
            if b in self.block_set:
                self._cache[b] = data
        return data

    def write(self) -> None:
        with open(self.path, "wb") as f:
            f.truncate(self.size)
            for b in self.blocks:
                f.seek(b * BLOCK)
                f.write(self.block(b))

    def expected(self, offset: int, length: int) -> bytes:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if first == last:
            lo = offset - first * BLOCK
            return self.block(first)[lo:lo + length]
        data = b"".join(self.block(b) for b in range(first, last + 1))
        lo = offset - first * BLOCK
        return data[lo:lo + length]


class Process:
    """A server process that listens on a UNIX socket."""

    def __init__(self, name: str, argv: list[str], sock: str, log: str) -> None:
        self.name, self.argv, self.sock, self.log = name, argv, sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Process:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=logf,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootcacheError(f"{self.name} exited ({self.proc.returncode}); "
                                     f"see {self.log}")
            if _connectable(self.sock):
                return self
            time.sleep(0.02)
        self.stop()
        raise BootcacheError(f"{self.name} did not start within {timeout} s; see {self.log}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _connectable(path: str) -> bool:
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Link:
    """nbdkit (rate + log filters) in front of the storage node's data."""

    def __init__(self, workdir: str, plugin_args: list[str], rate: str) -> None:
        self.sock = os.path.join(workdir, "link.sock")
        self.logfile = os.path.join(workdir, "link.log")
        argv = [need("nbdkit"), "-f", "-U", self.sock, "--filter=log", "--filter=rate",
                *plugin_args, f"logfile={self.logfile}", f"rate={rate}", "burstiness=0.05"]
        self.process = Process("storage node (nbdkit)", argv, self.sock,
                               os.path.join(workdir, "link.out"))
        self._mark = 0

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Link:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def mark(self) -> None:
        """Start counting bytes from now."""
        self._mark = os.path.getsize(self.logfile) if os.path.exists(self.logfile) else 0

    def bytes_since_mark(self) -> int:
        time.sleep(0.05)  # the log filter writes after each reply
        if not os.path.exists(self.logfile):
            return 0
        with open(self.logfile, "rb") as f:
            f.seek(self._mark)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(1), 16) for m in _READ_COUNT.finditer(text))


def bootcache_serve(workdir: str, name: str, image: str, export: str = "boot") -> Process:
    sock = os.path.join(workdir, f"{name}.sock")
    argv = [sys.executable, "-m", "bootcache", "serve", "--socket", sock, f"{image}={export}"]
    return Process(f"bootcache serve ({name})", argv, sock, os.path.join(workdir, f"{name}.out"))


def nbdkit_cache_node(workdir: str, upstream_sock: str) -> Process:
    sock = os.path.join(workdir, "nbdkit-cache.sock")
    argv = [need("nbdkit"), "-f", "-U", sock, "--filter=cache", "nbd",
            f"socket={upstream_sock}", "cache-on-read=true"]
    return Process("compute node (nbdkit cache filter)", argv, sock,
                   os.path.join(workdir, "nbdkit-cache.out"))


def create_cache(path: str, base_uri: str, quota: int, size: int,
                 run: Callable[[list[str]], None] | None = None,
                 profile: str | None = None) -> None:
    argv = [sys.executable, "-m", "bootcache", "create", "-q", "-f", "qcow2",
            "--cache-quota", str(quota), "-b", base_uri, "-F", "raw", path, str(size)]
    if profile:
        argv[-2:-2] = ["--cache-profile", profile]
    if os.path.exists(path):
        os.unlink(path)
    (run or _run)(argv)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise BootcacheError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
