"""The fleet benchmark's machinery: namespaces with shaped links, and a small fleet.

Real peers: iproute2 namespaces and veths, SeaweedFS S3 as the storage node,
``bootcache serve`` inside each node's namespace.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bootcache.storm import fleet, netns, nodes, trace

_why = netns.available()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


_PAYLOAD = 1 << 20
_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
n = 0
while chunk := s.recv(65536):
    n += len(chunk)
print(n)
"""


def test_nodes_reach_storage_and_egress_is_counted() -> None:
    with netns.Network(2, "100mbit") as net, socket.create_server(
            (netns.STORAGE_ADDR, 0)) as server:
        port = server.getsockname()[1]
        for node in net.nodes:
            before = node.egress_bytes()
            client = subprocess.Popen([*node.exec_prefix(), sys.executable, "-c", _CLIENT,
                                       netns.STORAGE_ADDR, str(port)],
                                      stdout=subprocess.PIPE, text=True)
            conn, _ = server.accept()
            with conn:
                conn.sendall(bytes(_PAYLOAD))
            out, _ = client.communicate(timeout=60)
            assert client.returncode == 0 and int(out) == _PAYLOAD
            # The megabyte crossed this node's link, and only this node's.
            assert _PAYLOAD <= node.egress_bytes() - before <= 1.1 * _PAYLOAD
        other = net.nodes[1].address
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "bcf-node0" in names and "bcf-node1" in names
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "bcf-node" not in names, "namespaces left behind"
    assert other == "10.201.0.11"


def _small_trace() -> trace.Trace:
    # The first reads of the Debian trace that fall in the first 256 MiB: a
    # 1 GiB base keeps the upload to the storage node short.
    full = trace.debian12()
    reqs = [r for r in full.requests if r.offset + r.length <= 256 << 20][:200]
    return trace.Trace(name="debian12-head", requests=reqs)


def test_small_fleet_egress_per_configuration(tmp_path: Path) -> None:
    tr = _small_trace()
    s = fleet.Settings(trace=tr, k=2, m=3, gap_scale=0.0,
                       configs=("no-cache", "cold", "pulled"),
                       workdir=str(tmp_path), progress=lambda _: None)
    rows = fleet.run(s)
    ws = tr.distinct_bytes(nodes.BLOCK)
    cold = [r for r in rows if r.config == "cold"]
    uncached = [r for r in rows if r.config == "no-cache"]
    assert len(cold) == len(uncached) == 2
    for r in cold:
        # One working set per node (the cache's read-ahead may add a little),
        # plus HTTP and TCP headers.
        assert ws <= r.egress_bytes <= 1.3 * ws, (r, ws)
    # Without a cache each of the M VMs on a node pulls what it reads.
    for r in uncached:
        assert r.egress_bytes >= 2 * ws, (r, ws)
    # One node boots cold and publishes; the other pulls about one working
    # set (random test data does not compress) and its boots read nothing.
    first = [r for r in rows if r.config == "pulled-first"]
    pulled = [r for r in rows if r.config == "pulled"]
    assert len(first) == len(pulled) == 1
    assert ws <= first[0].egress_bytes <= 1.3 * ws
    assert pulled[0].pull_bytes >= ws * 0.9 and pulled[0].egress_bytes < 64 * 1024, pulled
