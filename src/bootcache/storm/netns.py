"""Simulated compute nodes: one network namespace each, with its own shaped link.

    storage node (this namespace)                     compute node k
    bridge bcf-br 10.201.0.1/24 --- veth bcf-s<k> === bcf-n<k> 10.201.0.<10+k>

The storage side of each veth is a port of the bridge, so a server bound to
10.201.0.1 reaches every node, and each node's traffic crosses its own veth.
Both ends are shaped with a token bucket at the link rate (tbf), and the
storage side's transmit counter is that node's storage egress: every byte the
storage node sent it, headers included.

Only addresses inside these namespaces are used. Needs root, ``ip`` and
``tc`` (Debian iproute2); ``available()`` says why not when it cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

BRIDGE = "bcf-br"
STORAGE_ADDR = "10.201.0.1"
_PREFIX = 24


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _tc(dev: str, rate: str, ns: str | None = None) -> None:
    # A burst of ~1 ms at the rate keeps the shaping smooth at 1 Gbit/s.
    argv = ["tc", *(("-n", ns) if ns else ()), "qdisc", "replace", "dev", dev, "root",
            "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package iproute2)"
    probe = "bcf-probe"
    try:
        _ip("netns", "add", probe)
    except OSError as e:
        return f"cannot create a network namespace: {e}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    address: str
    storage_dev: str   # the veth end on the storage side (egress counter)

    def exec_prefix(self) -> list[str]:
        """Prefix an argv to run it inside this node's namespace."""
        return ["ip", "netns", "exec", self.netns]

    def egress_bytes(self) -> int:
        """Bytes the storage node has sent to this node so far."""
        with open(f"/sys/class/net/{self.storage_dev}/statistics/tx_bytes") as f:
            return int(f.read())


class Network:
    """The bridge and K node namespaces; a context manager that removes them."""

    def __init__(self, k: int, rate: str = "1gbit") -> None:
        if not 1 <= k <= 200:
            raise ValueError("between 1 and 200 nodes")
        self.k, self.rate = k, rate
        self.nodes: list[Node] = []

    def __enter__(self) -> Network:
        self._cleanup()
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{STORAGE_ADDR}/{_PREFIX}", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for i in range(self.k):
                self.nodes.append(self._add_node(i))
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _add_node(self, i: int) -> Node:
        ns, s_dev, n_dev = f"bcf-node{i}", f"bcf-s{i}", f"bcf-n{i}"
        address = f"10.201.0.{10 + i}"
        _ip("netns", "add", ns)
        _ip("link", "add", s_dev, "type", "veth", "peer", "name", n_dev)
        _ip("link", "set", n_dev, "netns", ns)
        _ip("link", "set", s_dev, "master", BRIDGE)
        _ip("link", "set", s_dev, "up")
        _ip("addr", "add", f"{address}/{_PREFIX}", "dev", n_dev, ns=ns)
        _ip("link", "set", n_dev, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _tc(s_dev, self.rate)
        _tc(n_dev, self.rate, ns=ns)
        return Node(i, ns, address, s_dev)

    def _cleanup(self) -> None:
        # Deleting a namespace deletes its veth end, and with it the peer.
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith("bcf-node"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        self.nodes = []
