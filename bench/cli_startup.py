"""Start-up time of the commands that do not serve, against ``qemu-img info``.

Each command is run RUNS times, the commands taking turns (so a burst of load
on a noisy machine hits them all alike); the median wall time of each is
reported with its ratio to ``qemu-img info`` measured in the same turns, and
the load average at the start. ``ctl list`` asks a ``bootcache serve`` that
the script starts (and waits for: it says READY=1 on $NOTIFY_SOCKET).

Bytecode: by default a first round, not counted, writes the bytecode caches
as an installed package has them (the children run without
PYTHONDONTWRITEBYTECODE). With ``--no-bytecode`` the bootcache package is
copied to a temporary folder and run from there with PYTHONDONTWRITEBYTECODE=1,
so its modules are compiled on every run, as in an editable install under
that variable (the standard library and click keep their caches).

Usage:
    .venv/bin/python bench/cli_startup.py [--runs 31] [--bootcache ".venv/bin/bootcache"]
                                          [--no-bytecode]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
PEER = "qemu-img info FILE"


def measure(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=env)
    return time.perf_counter() - t0


@contextmanager
def daemon(bc: list[str], image: str, tmp: str, env: dict[str, str]) -> Iterator[str]:
    """A ``bootcache serve`` exporting ``image``; yields its control socket
    once the daemon says it is ready."""
    sock = os.path.join(tmp, "nbd.sock")
    notify_path = os.path.join(tmp, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)
        proc = subprocess.Popen([*bc, "serve", "--read-only", "--socket", sock, image],
                                env={**env, "NOTIFY_SOCKET": notify_path},
                                stdout=subprocess.DEVNULL)
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            yield sock + ".ctl"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def package_copy(tmp: str) -> str:
    """A copy of the bootcache package without bytecode caches; returns the
    folder to put on PYTHONPATH."""
    spec = importlib.util.find_spec("bootcache")
    assert spec is not None and spec.submodule_search_locations
    root = os.path.join(tmp, "src")
    shutil.copytree(spec.submodule_search_locations[0], os.path.join(root, "bootcache"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--bootcache", help="the command to time, split as a shell would "
                    "(e.g. 'python -m bootcache'); default: bootcache beside this python",
                    default=os.path.join(os.path.dirname(sys.executable), "bootcache"))
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile bootcache's modules on every run (see above)")
    args = ap.parse_args()
    bc = shlex.split(args.bootcache)
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        env = dict(ENV)
        if args.no_bytecode:
            src = package_copy(tmp)
            env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [ENV.get("PYTHONPATH")])])
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        img = os.path.join(tmp, "x.qcow2")
        served = os.path.join(tmp, "served.qcow2")
        new = os.path.join(tmp, "new.qcow2")
        for path in (img, served):
            subprocess.run([*bc, "create", "-q", path, "1G"], check=True, env=env)
        with daemon(bc, served, tmp, env) as control:
            commands: dict[str, list[str]] = {
                "bootcache --help": [*bc, "--help"],
                "bootcache --version": [*bc, "--version"],
                "bootcache info FILE": [*bc, "info", img],
                "bootcache check FILE": [*bc, "check", img],
                "bootcache create FILE 1G": [*bc, "create", "-q", new, "1G"],
                "bootcache ctl list": [*bc, "ctl", "--control", control, "list"],
                # What any command pays before bootcache's own code: the
                # interpreter and click.
                "python: import click": [sys.executable, "-c", "import click"],
            }
            if shutil.which("qemu-img"):
                commands[PEER] = ["qemu-img", "info", img]
            times: dict[str, list[float]] = {name: [] for name in commands}
            for argv in commands.values():
                measure(argv, env)  # warm-up: bytecode caches, page cache
            load = os.getloadavg()[0]
            for _ in range(args.runs):
                for name, argv in commands.items():
                    times[name].append(measure(argv, env))
    bytecode = "compiled on every run" if args.no_bytecode else "bytecode caches written"
    print(f"{args.runs} runs each, load average {load:.2f} at the start, {bytecode}")
    peer = statistics.median(times[PEER]) if PEER in times else None
    print(f"| command | median | min | median / `{PEER}` |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{med / peer:.1f}" if peer else "-"
        print(f"| `{name}` | {med * 1000:.0f} ms | {min(ts) * 1000:.0f} ms | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
