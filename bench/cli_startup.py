"""Start-up time of the commands that do not serve, against ``qemu-img info``.

Each command is run RUNS times, the commands taking turns (so a burst of load
on a noisy machine hits them all alike); the median wall time of each is
reported, with the load average at the start. A first round, not counted,
writes the bytecode caches as an installed package has them (the children
run without PYTHONDONTWRITEBYTECODE: compiling every module on each run
would otherwise be most of what is measured).

Usage:
    .venv/bin/python bench/cli_startup.py [--runs 31] [--bootcache ".venv/bin/bootcache"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def measure(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=ENV)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--bootcache", help="the command to time, split as a shell would "
                    "(e.g. 'python -m bootcache'); default: bootcache beside this python",
                    default=os.path.join(os.path.dirname(sys.executable), "bootcache"))
    args = ap.parse_args()
    bc = shlex.split(args.bootcache)
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        img = os.path.join(tmp, "x.qcow2")
        new = os.path.join(tmp, "new.qcow2")
        subprocess.run([*bc, "create", "-q", img, "1G"], check=True)
        commands: dict[str, list[str]] = {
            "bootcache --help": [*bc, "--help"],
            "bootcache info FILE": [*bc, "info", img],
            "bootcache check FILE": [*bc, "check", img],
            "bootcache create FILE 1G": [*bc, "create", "-q", new, "1G"],
        }
        # What any command pays before bootcache's own code: the interpreter,
        # click and asyncio (the engine is async).
        commands["python: import click, asyncio"] = [sys.executable, "-c",
                                                     "import click, asyncio"]
        if shutil.which("qemu-img"):
            commands["qemu-img info FILE"] = ["qemu-img", "info", img]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for argv in commands.values():
            measure(argv)  # warm-up: bytecode caches, page cache
        load = os.getloadavg()[0]
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(measure(argv))
    print(f"{args.runs} runs each, load average {load:.2f} at the start")
    print("| command | median | min |")
    print("| --- | ---: | ---: |")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts) * 1000:.0f} ms | {min(ts) * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
