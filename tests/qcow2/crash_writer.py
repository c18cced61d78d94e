"""Writer process for the crash test (run as a script; the test SIGKILLs it).

    crash_writer.py IMAGE LOG SEED BATCH CLUSTER DISCARDS

Opens IMAGE writable through bootcache and runs the deterministic operation
stream ``op_stream(SEED, size, cluster)`` in batches of BATCH operations.
Before a batch it appends ``B <first op index>`` to LOG; after ``flush()``
returns it appends ``F <number of ops done>`` and fsyncs LOG. The test
regenerates the same stream to know what must have survived the kill.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator

# ("write" | "zeroes" | "discard", offset, data); data is what the range reads afterwards:
# zeros for "zeroes" and for "discard" (whole clusters only, used only on images where
# a discarded cluster reads as zeros).
Op = tuple[str, int, bytes]


def op_stream(seed: int, size: int, cluster: int, discards: bool = False) -> Iterator[Op]:
    """An endless, reproducible stream of writes, write-zeroes and discards."""
    rng = random.Random(seed)
    while True:
        kind = rng.randrange(8)
        if discards and rng.randrange(8) == 0:
            n = rng.randrange(1, 5)
            off = rng.randrange(0, size // cluster - n + 1) * cluster
            yield ("discard", off, bytes(n * cluster))
            continue
        if kind == 0:  # whole clusters
            n = rng.randrange(1, 4)
            off = rng.randrange(0, size // cluster - n + 1) * cluster
            length = n * cluster
        elif kind < 4:  # partial cluster, possibly straddling a boundary
            length = rng.randrange(1, min(cluster, 16384) + 1)
            off = rng.randrange(0, size - length + 1)
        else:  # up to two clusters (at least 128 KiB) anywhere
            length = rng.randrange(1, min(max(2 * cluster, 128 * 1024), 256 * 1024) + 1)
            off = rng.randrange(0, size - length + 1)
        if rng.randrange(6) == 0:
            yield ("zeroes", off, bytes(length))
        else:
            yield ("write", off, rng.randbytes(length))


def main() -> None:
    import bootcache

    image, log_path, seed, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with bootcache.open(image, writable=True) as disk:
        size = disk.size
        cluster, discards = int(sys.argv[5]), sys.argv[6] == "1"
        stream = op_stream(seed, size, cluster, discards)
        os.write(log, b"ready\n")
        os.fsync(log)
        done = 0
        while True:
            os.write(log, f"B {done}\n".encode())
            for _ in range(batch):
                kind, off, data = next(stream)
                if kind == "write":
                    disk.write(off, data)
                elif kind == "discard":
                    disk.discard(off, len(data))
                else:
                    disk.write_zeroes(off, len(data), may_unmap=bool(done % 2))
                done += 1
            disk.flush()
            os.write(log, f"F {done}\n".encode())
            os.fsync(log)


if __name__ == "__main__":
    main()
