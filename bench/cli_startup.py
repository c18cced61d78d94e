"""Start-up time of the commands that do not serve, against ``qemu-img info``.

Each command is run RUNS times, the commands taking turns (so a burst of load
on a noisy machine hits them all alike); the median wall time of each is
reported with its ratio to ``qemu-img info`` measured in the same turns, and
the load average at the start. The median CPU time (user + system, the
kernel's accounting of the finished child) is reported too: on a busy
machine the wall time also counts the time spent waiting for a processor,
the CPU time much less so. ``ctl list`` asks a ``bootcache serve`` that
the script starts (and waits for: it says READY=1 on $NOTIFY_SOCKET).

``--before SRC`` also times the same commands with the bootcache package of
another source tree (``SRC/bootcache``, put first on PYTHONPATH; e.g. a
``git archive`` of an older commit), in the same turns: on a busy machine
two separate runs are not comparable, one run's turns are.

Bytecode: by default a first round, not counted, writes the bytecode caches
as an installed package has them (the children run without
PYTHONDONTWRITEBYTECODE). With ``--no-bytecode`` each bootcache package is
copied to a temporary folder and run from there with PYTHONDONTWRITEBYTECODE=1,
so its modules are compiled on every run, as in an editable install under
that variable (the standard library and click keep their caches).

Usage:
    .venv/bin/python bench/cli_startup.py [--runs 31] [--bootcache ".venv/bin/bootcache"]
                                          [--before SRC] [--no-bytecode]
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
CLICK = "python: import click"


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``argv``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return wall, usage.ru_utime + usage.ru_stime


@contextmanager
def daemon(bc: list[str], image: str, tmp: str, env: dict[str, str]) -> Iterator[str]:
    """A ``bootcache serve`` exporting ``image``; yields its control socket
    once the daemon says it is ready."""
    sock = os.path.join(tmp, "nbd.sock")
    notify_path = os.path.join(tmp, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)
        log_path = os.path.join(tmp, "serve.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*bc, "serve", "--read-only", "--socket", sock, image],
                                    env={**env, "NOTIFY_SOCKET": notify_path},
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                while b"READY=1" not in notify.recv(4096).split(b"\n"):
                    pass
            except TimeoutError:
                with open(log_path, errors="replace") as f:
                    sys.exit(f"bootcache serve did not get ready:\n{f.read()}")
            yield sock + ".ctl"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def tree_env(src: str | None, tmp: str, name: str, no_bytecode: bool) -> dict[str, str]:
    """The environment that runs the bootcache package of ``src`` (None: the
    installed one), copied without bytecode caches if ``no_bytecode``."""
    env = dict(ENV)
    if src is None and not no_bytecode:
        return env
    if src is None:
        spec = importlib.util.find_spec("bootcache")
        assert spec is not None and spec.submodule_search_locations
        package = spec.submodule_search_locations[0]
    else:
        package = os.path.join(src, "bootcache")
    if no_bytecode:
        root = os.path.join(tmp, name)
        shutil.copytree(package, os.path.join(root, "bootcache"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        root = os.path.dirname(package)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [ENV.get("PYTHONPATH")])])
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--bootcache", help="the command to time, split as a shell would "
                    "(e.g. 'python -m bootcache'); default: bootcache beside this python",
                    default=os.path.join(os.path.dirname(sys.executable), "bootcache"))
    ap.add_argument("--before", metavar="SRC",
                    help="also time the bootcache package under SRC (see above)")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile bootcache's modules on every run (see above)")
    args = ap.parse_args()
    bc = shlex.split(args.bootcache)
    trees = {"after": None, "before": args.before} if args.before else {"after": None}
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        envs = {tree: tree_env(src, tmp, tree, args.no_bytecode) for tree, src in trees.items()}
        img = os.path.join(tmp, "x.qcow2")
        served = os.path.join(tmp, "served.qcow2")
        new = os.path.join(tmp, "new.qcow2")
        for path in (img, served):
            subprocess.run([*bc, "create", "-q", path, "1G"], check=True, env=envs["after"])
        with daemon(bc, served, tmp, envs["after"]) as control:
            commands = {
                "bootcache --help": [*bc, "--help"],
                "bootcache --version": [*bc, "--version"],
                "bootcache info FILE": [*bc, "info", img],
                "bootcache check FILE": [*bc, "check", img],
                "bootcache create FILE 1G": [*bc, "create", "-q", new, "1G"],
                "bootcache ctl list": [*bc, "ctl", "--control", control, "list"],
            }
            runs: list[tuple[str, str, list[str], dict[str, str]]] = [
                (name, tree, argv, env) for name, argv in commands.items()
                for tree, env in envs.items()]
            # What any command pays before bootcache's own code: the
            # interpreter and click.
            runs.append((CLICK, "", [sys.executable, "-c", "import click"], ENV))
            if shutil.which("qemu-img"):
                runs.append((PEER, "", ["qemu-img", "info", img], ENV))
            times: dict[tuple[str, str], list[tuple[float, float]]] = {
                (n, t): [] for n, t, _, _ in runs}
            for _, _, argv, env in runs:
                measure(argv, env)  # warm-up: bytecode caches, page cache
            load = os.getloadavg()[0]
            for _ in range(args.runs):
                for name, tree, argv, env in runs:
                    times[name, tree].append(measure(argv, env))
    wall = {key: statistics.median(w for w, _ in ts) * 1000 for key, ts in times.items()}
    cpu = {key: statistics.median(c for _, c in ts) * 1000 for key, ts in times.items()}
    bytecode = "compiled on every run" if args.no_bytecode else "bytecode caches written"
    print(f"{args.runs} runs each, load average {load:.2f} at the start, {bytecode}; "
          "medians in ms")
    peer = wall.get((PEER, ""))
    cols = ["wall", "cpu"]
    if args.before:
        cols = ["wall before", "wall after", "cpu before", "cpu after"]
    print(f"| command | {' | '.join(cols)} | wall / `{PEER}` |")
    print("|---" + "|---:" * (len(cols) + 1) + "|")
    for name in [*commands, CLICK, PEER]:
        key = (name, "after") if name in commands else (name, "")
        if key not in wall:
            continue
        cells: list[float | None]
        if not args.before:
            cells = [wall[key], cpu[key]]
        elif name in commands:
            cells = [wall[name, "before"], wall[key], cpu[name, "before"], cpu[key]]
        else:
            cells = [None, wall[key], None, cpu[key]]  # not bootcache's: measured once
        text = [f"{c:.0f}" if c is not None else "" for c in cells]
        ratio = f"{wall[key] / peer:.1f}" if peer else "-"
        print(f"| `{name}` | {' | '.join(text)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
