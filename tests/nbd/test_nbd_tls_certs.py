"""TLS with client certificates (issue 9 item 5): ``bootcache serve --tls-cert
--tls-key --tls-ca CA --tls-required`` against libnbd and QEMU clients.

A real PKI is made with ``openssl`` once per module: a CA, a server certificate
and a client certificate it signed, and a second CA with a client certificate
of its own. Each client directory follows the layout libnbd
(``tls-certificates=DIR``) and QEMU (``tls-creds-x509,dir=DIR,endpoint=client``)
both read: ca-cert.pem, client-cert.pem, client-key.pem. Peers are verified
(libnbd's ``tls-verify-peer`` and QEMU's ``verify-peer`` keep their default, on).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nbd_testlib import Client, need, serve, short_tmpdir

from bootcache.nbd import wire as w

pytestmark = pytest.mark.skipif(bool(need("openssl", "nbdinfo")),
                                reason=str(need("openssl", "nbdinfo")))

EXPORT = "disk"
SIZE = 4 << 20

CA_EXT = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""
CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def openssl(*args: str | os.PathLike[str]) -> None:
    p = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, f"openssl {args}: {p.stderr}"


def _key(path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", path)


def _config(d: Path, name: str, extensions: str) -> Path:
    """An openssl config naming the subject ``name``, with ``extensions`` in [ext]."""
    cfg = d / f"{name}.cnf"
    cfg.write_text(f"[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = {name}\n"
                   f"[ext]\n{extensions}")
    return cfg


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    _key(key)
    openssl("req", "-x509", "-new", "-key", key, "-days", "2", "-config",
            _config(d, name, CA_EXT), "-extensions", "ext", "-out", cert)
    return cert, key


def _signed(d: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}-cert.pem"
    _key(key)
    cfg = _config(d, name, extensions)
    openssl("req", "-new", "-key", key, "-config", cfg, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-days", "2", "-extfile", cfg, "-extensions", "ext", "-out", cert)
    return cert, key


def _client_dir(d: Path, ca_certs: list[Path], client: tuple[Path, Path] | None) -> Path:
    d.mkdir()
    (d / "ca-cert.pem").write_text("".join(c.read_text() for c in ca_certs))
    if client is not None:
        shutil.copy(client[0], d / "client-cert.pem")
        shutil.copy(client[1], d / "client-key.pem")
    return d


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    good: Path  # client certificate from the server's CA
    anonymous: Path  # trusts the server, has no certificate
    wrong_ca: Path  # trusts the server (and its own CA), certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    other_ca = _ca(d, "other-ca")
    server = _signed(d, "server", ca, SERVER_EXT)
    client = _signed(d, "client", ca, CLIENT_EXT)
    stranger = _signed(d, "stranger", other_ca, CLIENT_EXT)
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1],
               good=_client_dir(d / "good", [ca[0]], client),
               anonymous=_client_dir(d / "anonymous", [ca[0]], None),
               # QEMU checks its own certificate against its CA file before connecting:
               # trust both CAs, so that the refusal is the server's.
               wrong_ca=_client_dir(d / "wrong-ca", [ca[0], other_ca[0]], stranger))


@dataclass
class Served:
    sock: str
    image: Path
    content: bytes
    proc: subprocess.Popen[bytes]

    def uri(self, certs: Path) -> str:
        return f"nbds+unix:///{EXPORT}?socket={self.sock}&tls-certificates={certs}"

    def plain_uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def qemu_opts(self, certs: Path) -> list[str]:
        """QEMU's arguments for this export as a TLS client with ``certs``."""
        return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
                "--image-opts",
                f"driver=nbd,path={self.sock},export={EXPORT},tls-creds=tls0,"
                "tls-hostname=localhost"]  # QEMU verifies a name even over a UNIX socket


@pytest.fixture
def served(pki: Pki, tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.raw"
    content = bytes(range(256)) * (SIZE // 256)
    content = content[:SIZE // 2] + os.urandom(SIZE // 2)
    image.write_bytes(content)
    d = short_tmpdir()
    sock = f"{d}/s"
    try:
        with serve("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                   "--tls-ca", str(pki.ca), "--tls-required", f"{image}={EXPORT}",
                   sock=sock) as proc:
            yield Served(sock, image, content, proc)
            assert proc.poll() is None, "the server died"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60,
                          check=False)


def ok(*cmd: str | os.PathLike[str]) -> str:
    p = run(*cmd)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    return p.stdout


def refused(*cmd: str | os.PathLike[str]) -> str:
    p = run(*cmd)
    assert p.returncode != 0, f"{cmd} was served:\n{p.stdout}{p.stderr}"
    return p.stdout + p.stderr


def test_libnbd_with_the_ca_signed_client_certificate(served: Served, pki: Pki,
                                                      tmp_path: Path) -> None:
    assert ok("nbdinfo", "--size", served.uri(pki.good)).strip() == str(SIZE)
    if not need("nbdcopy"):
        out = tmp_path / "copy.raw"
        ok("nbdcopy", served.uri(pki.good), out)
        assert out.read_bytes() == served.content


@pytest.mark.skipif(bool(need("qemu-img", "qemu-io")), reason=str(need("qemu-img", "qemu-io")))
def test_qemu_with_the_ca_signed_client_certificate(served: Served, pki: Pki,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "qemu.raw"
    ok("qemu-img", "convert", "-O", "raw", *served.qemu_opts(pki.good), out)
    assert out.read_bytes() == served.content
    half = SIZE // 2
    p = ok("qemu-io", *served.qemu_opts(pki.good), "-c", "read -P 0x00 0 1",
           "-c", "read -P 0xff 255 1", "-c", f"read -v {half} 16")
    assert served.content[half:half + 16].hex() in p.replace(" ", ""), p
    # A write through TLS lands in the image.
    ok("qemu-io", *served.qemu_opts(pki.good), "-c", "write -P 0x5c 4096 4096", "-c",
       "flush")
    assert served.image.read_bytes()[4096:8192] == b"\x5c" * 4096


@pytest.mark.skipif(bool(need("qemu-nbd")), reason=str(need("qemu-nbd")))
def test_qemu_nbd_lists_exports_over_tls(served: Served, pki: Pki) -> None:
    creds = f"tls-creds-x509,id=tls0,dir={pki.good},endpoint=client"
    p = ok("qemu-nbd", "--list", "--object", creds, "--tls-creds", "tls0",
           "--tls-hostname", "localhost", "-k", served.sock)
    assert f"export: '{EXPORT}'" in p and f"size:  {SIZE}" in p, p
    refused("qemu-nbd", "--list", "--object",
            f"tls-creds-x509,id=tls0,dir={pki.wrong_ca},endpoint=client",
            "--tls-creds", "tls0", "--tls-hostname", "localhost", "-k", served.sock)


def test_clients_without_a_good_certificate_are_refused(served: Served, pki: Pki) -> None:
    good = served.uri(pki.good)
    for certs in (pki.anonymous, pki.wrong_ca):
        refused("nbdinfo", "--size", served.uri(certs))
        # The server keeps serving everyone else.
        assert ok("nbdinfo", "--size", good).strip() == str(SIZE)
    if not need("qemu-io"):
        for certs in (pki.anonymous, pki.wrong_ca):
            out = refused("qemu-io", *served.qemu_opts(certs), "-c", "read 0 4k")
            assert "failed validation" not in out, out  # refused by the server, not itself
            assert ok("nbdinfo", "--size", good).strip() == str(SIZE)


def test_plain_text_clients_are_refused(served: Served, pki: Pki) -> None:
    refused("nbdinfo", "--size", served.plain_uri())
    if not need("qemu-io"):
        refused("qemu-io", "-f", "raw", "-c", "read 0 4k", served.plain_uri())
    # At the protocol level: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD.
    c = Client(served.sock)
    try:
        c.greeting()
        for opt, data in ((w.OPT_GO, w.U32.pack(len(EXPORT)) + EXPORT.encode() + w.U16.pack(0)),
                          (w.OPT_LIST, b""), (w.OPT_STRUCTURED_REPLY, b"")):
            assert c.option(opt, data)[-1].reply == w.REP_ERR_TLS_REQD
    finally:
        c.sock.close()
    assert ok("nbdinfo", "--size", served.uri(pki.good)).strip() == str(SIZE)
