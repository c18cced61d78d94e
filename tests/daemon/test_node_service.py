"""The node service: one daemon owns each image once, and its catalog
changes while clients read (issue 10, items 1, 2 and 4).

Real peers throughout: nbdcopy/nbdinfo/qemu-io as NBD clients, qemu-img
check on the images afterwards, an HTTP GET of /metrics parsed with
prometheus_client's parser.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cache.conftest import (
    CLUSTER,
    QEMU_IO,
    MiB,
    assert_qemu_check,
    bootcache,
    child_env,
    create_cache,
    make_base,
    pattern_base,
    run,
    wait_for,
)

SIZE = 4 * MiB


def nbdcopy_out(uri: str) -> bytes:
    return run(["nbdcopy", uri, "-"]).stdout


def overlay(path: Path, backing: str) -> None:
    bootcache("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)


def node(tmp_path: Path) -> tuple[Path, bytes]:
    """A base, a cache over it and two VM overlays over the cache."""
    base = make_base(tmp_path / "base.raw", SIZE, seed=101)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    for vm in ("vm1", "vm2"):
        overlay(tmp_path / f"{vm}.qcow2", "cache.qcow2")
    return cache, base


def test_cache_and_overlays_share_one_open_cache(tmp_path: Path, daemons: Any) -> None:
    cache, base = node(tmp_path)
    d = daemons(f"{cache}=deb", str(tmp_path / "vm1.qcow2"), str(tmp_path / "vm2.qcow2"))
    listed = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={d.sock}"]).stdout
    assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == \
        ["deb", "vm1", "vm2"]
    for name in ("vm1", "vm2", "deb"):
        assert nbdcopy_out(d.uri(name)) == base, name
    stats = json.loads(d.ctl("stats", "--output", "json").stdout)["exports"]
    (key, cache_stats), = stats["vm1"]["caches"].items()
    assert key == str(cache) and stats["vm2"]["caches"][key] == cache_stats
    # Three readers of the whole disk, one fetch from the base.
    assert cache_stats["bytes_from_base"] == SIZE
    assert stats["vm1"]["reads"] > 0 and stats["vm1"]["read_bytes"] == SIZE
    assert d.stop() == 0
    assert_qemu_check(cache)
    for vm in ("vm1", "vm2"):
        assert_qemu_check(tmp_path / f"{vm}.qcow2")


def test_lock_held_by_another_process_is_named(tmp_path: Path, daemons: Any) -> None:
    cache, _ = node(tmp_path)
    holder = daemons(f"{cache}=deb", name="holder")
    proc = bootcache("serve", "--socket", holder.sock + "2", f"{cache}=deb", check=False,
                     env=child_env())
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert str(cache) in err or "cache.qcow2" in err, err
    assert "another process" in err and "fuser" in err, err


def test_ctl_adds_and_removes_exports_at_runtime(tmp_path: Path, daemons: Any) -> None:
    cache, base = node(tmp_path)
    d = daemons(f"{cache}=deb")
    d.ctl("add", f"{tmp_path / 'vm1.qcow2'}=one")
    d.ctl("add", str(tmp_path / "vm2.qcow2"), "--read-only")
    listed = {e["name"]: e for e in json.loads(d.ctl("list", "--output", "json").stdout)}
    assert set(listed) == {"deb", "one", "vm2"}
    assert listed["vm2"]["read_only"] and not listed["one"]["read_only"]
    assert nbdcopy_out(d.uri("one")) == base
    d.ctl("remove", "one")
    assert "one" not in d.ctl("list").stdout
    proc = run(["nbdinfo", d.uri("one")], check=False)
    assert proc.returncode != 0  # gone for new clients
    assert nbdcopy_out(d.uri("deb")) == base  # the shared cache is still open
    assert d.stop() == 0
    assert_qemu_check(cache)


def test_bad_requests_change_nothing(tmp_path: Path, daemons: Any) -> None:
    cache, _ = node(tmp_path)
    allowed = tmp_path / "images"
    allowed.mkdir()
    env = child_env(tmp_path)
    env["BOOTCACHE_BACKING_DIRS"] = str(tmp_path)
    d = daemons(f"{cache}=deb", env=env)
    before = d.ctl("list", "--output", "json").stdout

    def refused(*args: str, says: str) -> None:
        proc = d.ctl(*args, check=False)
        assert proc.returncode != 0, args
        assert says in proc.stderr, proc.stderr

    refused("remove", "nope", says="no export named 'nope'")
    refused("add", f"{tmp_path / 'vm1.qcow2'}=deb", says="already in use")
    refused("add", "/etc/passwd", says="outside the allowed image folders")
    refused("add", str(tmp_path / "missing.qcow2"), says="missing.qcow2")
    refused("add", f"{tmp_path / 'vm1.qcow2'}=bad/name", says="export name")
    # Malformed JSON, straight onto the socket.
    for body in (b"{not json", b"[1, 2]", b'{"image": 5}', b'{"image": "x", "extra": 1}'):
        status, answer = raw_request(d.control, "POST", "/v1/exports", body)
        assert status == 400 and "error" in answer, (body, status, answer)
    status, answer = raw_request(d.control, "DELETE", "/v1/exports/nope", b"")
    assert status == 404
    assert d.ctl("list", "--output", "json").stdout == before


def raw_request(path: str, method: str, url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
                  + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_control_socket_is_private(tmp_path: Path, daemons: Any) -> None:
    cache, _ = node(tmp_path)
    d = daemons(f"{cache}=deb")
    assert os.stat(d.control).st_mode & 0o777 == 0o600
    # Even with the mode opened up, another user is refused (SO_PEERCRED).
    os.chmod(d.control, 0o666)
    os.chmod(os.path.dirname(d.control), 0o755)
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
            "s.sendall(b'GET /v1/exports HTTP/1.1\\r\\nHost: x\\r\\n'\n"
            "          b'Connection: close\\r\\n\\r\\n')\n"
            "d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\n"
            "print(d.split()[1].decode())")
    proc = subprocess.run(["python3", "-c", code, d.control], capture_output=True, text=True,
                          user=65534, group=65534, timeout=30)
    assert proc.stdout.strip() == "403", (proc.stdout, proc.stderr)
    assert "deb" in d.ctl("list").stdout  # its own user still gets in


def test_remove_refuses_connected_clients_unless_forced(tmp_path: Path, daemons: Any) -> None:
    base = pattern_base(tmp_path / "base.raw", SIZE)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    overlay(tmp_path / "vm1.qcow2", "cache.qcow2")
    d = daemons(f"{cache}=deb", str(tmp_path / "vm1.qcow2"))
    # qemu-io holds a connection open while it waits for its input.
    client = subprocess.Popen([QEMU_IO, "-r", "-f", "raw", d.uri("vm1")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"read -P {base[0]} 0 {CLUSTER}\n")
        client.stdin.flush()
        assert "read 65536/65536" in client.stdout.readline() + client.stdout.readline()
        proc = d.ctl("remove", "vm1", check=False)
        assert proc.returncode != 0 and "connected" in proc.stderr
        assert "vm1" in d.ctl("list").stdout
        d.ctl("remove", "vm1", "--force")
        assert "vm1" not in d.ctl("list").stdout
        client.stdin.write(f"read -P {base[0]} 0 {CLUSTER}\n")
        client.stdin.flush()
        client.stdin.close()
        rest = client.stdout.read()
        assert "read 65536/65536" not in rest  # disconnected, not served
    finally:
        client.kill()
        client.wait()
    assert d.stop() == 0
    assert_qemu_check(tmp_path / "vm1.qcow2")
    assert_qemu_check(cache)


def test_catalog_changes_do_not_disturb_a_reader(tmp_path: Path, daemons: Any) -> None:
    base = pattern_base(tmp_path / "base.raw", SIZE)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota="100M")
    for vm in ("vm1", "vm2"):
        overlay(tmp_path / f"{vm}.qcow2", "cache.qcow2")
    d = daemons(f"{cache}=deb")
    # One connection, held open throughout, reading (pattern-checked) while
    # other exports of the same cache come and go.
    out_path = tmp_path / "reader.out"  # a file: a full pipe would stall the reader
    reader = subprocess.Popen([QEMU_IO, "-r", "-f", "raw", d.uri("deb")],
                              stdin=subprocess.PIPE, stdout=out_path.open("wb"),
                              stderr=subprocess.STDOUT, text=True)
    assert reader.stdin is not None
    batch = "".join(f"read -P {base[k * CLUSTER]} {k * CLUSTER} {CLUSTER}\n"
                    for k in range(SIZE // CLUSTER))
    cycles = 6
    for _ in range(cycles):
        for _ in range(8):
            reader.stdin.write(batch)
        reader.stdin.flush()
        d.ctl("add", f"{tmp_path / 'vm1.qcow2'}=a")
        d.ctl("add", f"{tmp_path / 'vm2.qcow2'}=b")
        assert nbdcopy_out(d.uri("a")) == base
        d.ctl("remove", "a")
        d.ctl("remove", "b")
        assert reader.poll() is None, out_path.read_text()[-2000:]
    reader.stdin.write("quit\n")
    reader.stdin.close()
    assert reader.wait(120) == 0
    out = out_path.read_text()
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out[-2000:]
    assert out.count("read 65536/65536") == cycles * 8 * (SIZE // CLUSTER)
    assert d.stop() == 0
    assert_qemu_check(cache)


def test_metrics_scraped_over_http(tmp_path: Path, daemons: Any) -> None:
    cache, base = node(tmp_path)
    d = daemons(f"{cache}=deb", str(tmp_path / "vm1.qcow2"), "--metrics", "127.0.0.1:0")
    assert nbdcopy_out(d.uri("vm1")) == base
    assert nbdcopy_out(d.uri("deb")) == base
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(d.where["metrics"], timeout=30) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        samples.clear()
        samples.update({(s.name, tuple(sorted(s.labels.items()))): s.value
                        for fam in text_string_to_metric_families(text) for s in fam.samples})
        return samples

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    # nbdcopy has exited, but the daemon notices its disconnects on its own time.
    wait_for(lambda: scrape() and all(
        value("bootcache_export_connections", export=e) == 0 for e in ("deb", "vm1")),
        30, "the nbdcopy connections closed")

    image = str(cache)
    assert value("bootcache_cache_bytes_from_base_total", image=image) == SIZE
    assert value("bootcache_cache_used_bytes", image=image) == SIZE
    assert value("bootcache_cache_quota_bytes", image=image) == 100 * MiB
    assert value("bootcache_cache_misses_total", image=image) > 0
    assert value("bootcache_cache_hits_total", image=image) > 0  # deb's reads were hits
    assert value("bootcache_export_read_bytes_total", export="vm1") == SIZE
    reads = value("bootcache_export_reads_total", export="deb")
    assert value("bootcache_export_read_seconds_count", export="deb") == reads > 0
    assert value("bootcache_export_read_seconds_bucket", export="deb", le="+Inf") == reads
    assert value("bootcache_export_connections", export="deb") == 0
    # ctl stats reads the same counters.
    stats = json.loads(d.ctl("stats", "deb", "--output", "json").stdout)
    assert stats["reads"] == reads and stats["caches"][image]["bytes_from_base"] == SIZE
    # And so does `bootcache cache stats` while the daemon runs.
    live = json.loads(bootcache("cache", "stats", "--output", "json", cache).stdout)
    assert live["bytes_from_base"] == SIZE and "live-from" in live
