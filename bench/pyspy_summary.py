"""Summarise a ``py-spy record -f raw`` profile of bench/cold_miss.py.

Keeps the event loop thread's samples taken while the trace is replayed
(set-up and close left out), then prints the functions with the most
samples of their own and a split by the innermost frame of a known kind.

Usage:
    py-spy record -r 1000 -f raw -o prof.txt -- .venv/bin/python bench/cold_miss.py ...
    .venv/bin/python bench/pyspy_summary.py prof.txt [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import re

# Innermost frame wins: the first of these found walking from the leaf up.
KINDS = [
    ("http client (aiohttp, yarl, multidict)", re.compile(r"(^|[/(])(aiohttp|yarl|multidict)/")),
    ("s3 client (botocore)", re.compile(r"(^|[/(])(aiobotocore|botocore)/")),
    ("sources (bootcache)", re.compile(r"bootcache/sources/")),
    ("qcow2 (bootcache)", re.compile(r"bootcache/qcow2/")),
    ("cache layer (bootcache)", re.compile(r"bootcache/layers/")),
    ("asyncio, thread pool", re.compile(r"(^|[/(])(asyncio|concurrent)/")),
]
SETUP = re.compile(r"open_layer|make_cache|CacheLayer\.close|start_http|randbytes|"
                   r"write_bytes|Qcow2Image\.close")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    own: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if frames[0].startswith("thread ("):  # recorded with --threads
                if "MainThread" not in frames[0]:
                    continue
                frames = frames[1:]
            if SETUP.search(stack):
                continue
            if not any("replay (" in fr or "_run_once" in fr or "Task" in fr
                       for fr in frames) and "bootcache/" not in stack:
                continue
            n = int(count)
            total += n
            own[frames[-1]] += n
            for fr in reversed(frames):
                kind = next((k for k, rx in KINDS if rx.search(fr)), None)
                if kind:
                    kinds[kind] += n
                    break
            else:
                kinds["other (loop, interpreter)"] += n
    print(f"{total} samples on the loop thread during replays")
    print("\n| share | kind (innermost frame) |\n|---:|---|")
    for k, n in kinds.most_common():
        print(f"| {100 * n / total:.1f}% | {k} |")
    print("\n| share | function (own samples) |\n|---:|---|")
    for fr, n in own.most_common(args.top):
        print(f"| {100 * n / total:.1f}% | `{fr}` |")


if __name__ == "__main__":
    main()
