"""A real ``bootcache serve`` daemon for the node-service tests.

The daemon runs as its own process (as on a node); tests talk to it the way
a node's tools do: NBD clients (nbdcopy, nbdinfo, qemu-io), ``bootcache ctl``
over the control socket, an HTTP GET of /metrics.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cache.conftest
from cache.conftest import child_env, wait_for

# The short socket folder of the cache tests, as a fixture here too.
sockdir = cache.conftest.sockdir

SERVING = re.compile(r"bootcache serve: serving .* on (.*)")


class Daemon:
    """One ``bootcache serve`` process; ``ctl()`` runs ``bootcache ctl`` against it."""

    def __init__(self, workdir: Path, sockdir: str, *args: str,
                 env: dict[str, str] | None = None, name: str = "d") -> None:
        self.sock = os.path.join(sockdir, f"{name}.sock")
        self.control = self.sock + ".ctl"
        self.log_path = workdir / f"serve-{name}.log"
        self.args = args
        self.env = env or child_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.where: dict[str, str] = {}

    def start(self, *extra: str) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bootcache", "serve", "--socket", self.sock, *self.args,
             *extra], stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

        def ready() -> bool:
            assert self.proc is not None
            text = self.log_path.read_bytes()[start:].decode(errors="replace")
            m = SERVING.search(text)
            if m:
                self.where = dict(w.split(":", 1) for w in m.group(1).split())
                return True
            return self.proc.poll() is not None

        wait_for(ready, 30, "bootcache serve")
        assert self.proc.poll() is None, self.log()
        return self

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "bootcache", "ctl", "--control",
                               self.control, *args], capture_output=True, text=True,
                              env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctl {args} exited {proc.returncode}: {proc.stderr}")
        return proc

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc


@pytest.fixture
def daemons(tmp_path: Path, sockdir: str) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(*args: str, env: dict[str, str] | None = None, name: str = "d",
             start: bool = True) -> Daemon:
        d = Daemon(tmp_path, sockdir, *args, env=env, name=name)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
