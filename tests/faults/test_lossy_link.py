"""A slow, lossy link to the storage node (issue 9, item 2).

The base is served by nginx inside a network namespace made for the test,
reached over a veth pair; the link is made slow and lossy, 50 ms each way
and 1% of packets lost each way, in one of two ways:

- ``netem``: ``tc netem delay 50ms loss 1%`` on both ends (skipped on kernels
  built without sch_netem, like this project's CI machine);
- ``nfqueue``: in the namespace, iptables' ``statistic`` match drops 1% of
  the packets each way and an NFQUEUE rule hands the rest to
  tools/link_delay.py, which holds each one 50 ms before letting it go:
  real loss and a real round-trip time, with TCP's own retransmissions.

A storm of readers checking
every byte reads through ``bootcache serve``: it completes with the right
bytes, and the bytes crossing the link (the veth's counters) stay at about
one working set, however many readers want it.

tools/chaos.py ``link`` is the long version.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cache.conftest import CLUSTER, MiB, bootcache, pattern_base, wait_for

SIZE = 8 * MiB
CLUSTERS = SIZE // CLUSTER
READERS = 8
PORT = 8080
LINK_DELAY = Path(__file__).resolve().parents[2] / "tools" / "link_delay.py"


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


class Link:
    """A namespace with nginx at its end of a veth pair; the host end is shaped."""

    def __init__(self, workdir: Path, shaping: str) -> None:
        tag = f"{os.getpid() % 10000}"
        self.ns = f"bcl{tag}"
        self.host_if, self.ns_if = f"bcl{tag}h", f"bcl{tag}n"
        octet = os.getpid() % 250 + 1
        self.host_ip, self.ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.workdir = workdir
        self.shaping = shaping
        self.nginx: subprocess.Popen[bytes] | None = None
        self.delayer: subprocess.Popen[str] | None = None

    def up(self) -> None:
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
                     self.ns_if],
                    ["ip", "link", "set", self.ns_if, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
                    ["ip", "link", "set", self.host_if, "up"],
                    ["ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
                    ["ip", "-n", self.ns, "link", "set", self.ns_if, "up"],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"]):
            proc = sh(*cmd)
            if proc.returncode != 0:
                raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        if self.shaping == "netem":
            # Both directions: the host end's egress, and the namespace end's.
            for ns in ([], ["-n", self.ns]):
                dev = self.ns_if if ns else self.host_if
                proc = sh("tc", *ns, "qdisc", "add", "dev", dev, "root", "netem", "delay",
                          "50ms", "loss", "1%")
                if proc.returncode != 0:
                    raise OSError(f"tc netem: {proc.stderr.strip()}")
        else:
            self._delay_in_namespace()

    def _delay_in_namespace(self) -> None:
        queue = os.getpid() % 60000 + 1
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            for target in (["-m", "statistic", "--mode", "random", "--probability", "0.01",
                            "-j", "DROP"],
                           ["-j", "NFQUEUE", "--queue-num", str(queue)]):
                proc = sh("ip", "netns", "exec", self.ns, "iptables", "-A", chain, way,
                          self.ns_if, *target)
                if proc.returncode != 0:
                    raise OSError(f"iptables {' '.join(target)}: {proc.stderr.strip()}")
        try:
            import netfilterqueue  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as e:
            raise OSError(f"no NetfilterQueue module: {e}") from e
        self.delayer = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, str(LINK_DELAY),
             "--queue", str(queue), "--delay", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.delayer.stdout is not None
        line = self.delayer.stdout.readline()  # the delayer says when its queue is bound
        if line.strip() != "ready":
            self.delayer.kill()
            _, err = self.delayer.communicate(timeout=30)
            raise OSError(f"tools/link_delay.py: {err.strip() or line!r}")

    def serve(self, root: Path) -> str:
        prefix = self.workdir / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
user root;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{ listen {self.ns_ip}:{PORT}; root {root}; }}
}}
""")
        self.nginx = subprocess.Popen(["ip", "netns", "exec", self.ns, "nginx", "-c", str(conf),
                                       "-p", str(prefix), "-g", "daemon off;"])

        def listening() -> bool:
            try:
                socket.create_connection((self.ns_ip, PORT), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, 30, "nginx in the namespace")
        return f"http://{self.ns_ip}:{PORT}"

    def rx_bytes(self) -> int:
        """Bytes the host received over the link (the base's replies)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def down(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(30)
        if self.delayer is not None:
            self.delayer.kill()
            self.delayer.wait(30)
        sh("ip", "link", "del", self.host_if)
        sh("ip", "netns", "del", self.ns)


@pytest.fixture(params=["netem", "nfqueue"])
def link(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    lk = Link(tmp_path, request.param)
    try:
        lk.up()
    except OSError as e:
        lk.down()
        pytest.skip(f"cannot shape a link here: {e}")
    try:
        yield lk
    finally:
        lk.down()


def test_storm_over_a_slow_lossy_link(tmp_path: Path, link: Link, daemons: Any) -> None:
    www = tmp_path / "www"
    www.mkdir()
    base = pattern_base(www / "base.raw", SIZE)
    url = link.serve(www) + "/base.raw"
    cache = tmp_path / "cache.qcow2"
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", url, "-F", "raw",
              cache, str(SIZE))
    before = link.rx_bytes()
    d = daemons(f"{cache}=deb", "--remote-option", "deadline=120")
    start = time.monotonic()
    readers = []
    for i in range(READERS):
        order = list(range(CLUSTERS))[i * CLUSTERS // READERS:] + \
            list(range(CLUSTERS))[:i * CLUSTERS // READERS]
        args = [a for k in order
                for a in ("-c", f"read -P {base[k * CLUSTER]} {k * CLUSTER} {CLUSTER}")]
        readers.append(subprocess.Popen(["qemu-io", "-r", "-f", "raw", d.uri("deb"), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for r in readers:
        out, _ = r.communicate(timeout=600)
        assert b"Pattern verification failed" not in out, out[-2000:]
        assert out.count(b"read 65536/65536") == CLUSTERS, out[-2000:]
        assert r.returncode == 0
    elapsed = time.monotonic() - start
    link_bytes = link.rx_bytes() - before
    # One working set (plus headers, ACK-free replies, retransmissions, the
    # identity's sampled blocks), not READERS of them.
    assert SIZE <= link_bytes <= 1.25 * SIZE, (link_bytes, SIZE)
    print(f"{link.shaping}: {READERS} readers x {SIZE >> 20} MiB in {elapsed:.1f} s, "
          f"link bytes {link_bytes} ({link_bytes / SIZE:.3f} working sets)")
    assert d.stop() == 0
    assert bootcache("check", cache, check=False).returncode == 0
