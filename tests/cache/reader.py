"""A separate process that reads through a cache image (for restart and crash tests).

    python reader.py pass CACHE BASE [NBDKIT_LOG]
        open CACHE with bootcache.open, read it all in 1 MiB chunks, compare
        every byte with the file BASE, print one JSON line: sha256, the cache
        counters, and (with NBDKIT_LOG) how many base reads nbdkit logged
        before and after the pass.
    python reader.py random CACHE BASE SEED [FLUSH_PROBABILITY]
        open CACHE, print "ready", then read random ranges forever, comparing
        each with BASE, and flush after a read with the given probability
        (default 0); exit 3 on the first wrong byte (the crash test kills
        this process at random moments).

Exit codes: 0 ok, 3 wrong bytes served.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time

import bootcache

_READ = re.compile(r" Read id=\d+ offset=0x[0-9a-f]+ count=0x[0-9a-f]+ \.\.\.")


def logged_reads(path: str) -> int:
    """Reads nbdkit's log filter recorded, once each has logged its return."""
    deadline = time.monotonic() + 5
    while True:
        with open(path) as f:
            text = f.read()
        if text.count(" Read id=") == text.count("...Read id=") or time.monotonic() > deadline:
            return len(_READ.findall(text))
        time.sleep(0.02)


def wrong(what: str, got: bytes, want: bytes) -> None:
    i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), None)
    sys.stderr.write(f"WRONG BYTES {what}: len {len(got)}/{len(want)}, first diff at {i}\n")
    sys.stderr.flush()
    sys.exit(3)


def do_pass(cache: str, base_path: str, log: str | None) -> None:
    with open(base_path, "rb") as f:
        base = f.read()
    with bootcache.open(cache) as img:
        before = logged_reads(log) if log else None
        h = hashlib.sha256()
        chunk = 1 << 20
        for off in range(0, img.size, chunk):
            n = min(chunk, img.size - off)
            data = img.read(off, n)
            if data != base[off:off + n]:
                wrong(f"at {off}+{n}", data, base[off:off + n])
            h.update(data)
        after = logged_reads(log) if log else None
        stats = img.layer.stats()  # type: ignore[attr-defined]
    print(json.dumps({"sha256": h.hexdigest(), "stats": stats, "reads_after_open": before,
                      "reads_after_pass": after}))


def do_random(cache: str, base_path: str, seed: int, flush_probability: float) -> None:
    with open(base_path, "rb") as f:
        base = f.read()
    rng = random.Random(seed)
    with bootcache.open(cache) as img:
        print("ready", flush=True)
        size = img.size
        while True:
            n = rng.choice([1, 511, 4096, 65536, 65537, 200_000])
            n = min(n, size)
            off = rng.randrange(0, size - n + 1)
            data = img.read(off, n)
            if data != base[off:off + n]:
                wrong(f"at {off}+{n}", data, base[off:off + n])
            if rng.random() < flush_probability:
                img.flush()


def main() -> None:
    mode = sys.argv[1]
    if mode == "pass":
        do_pass(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif mode == "random":
        do_random(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                  float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
