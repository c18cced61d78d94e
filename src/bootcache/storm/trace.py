"""Boot traces: every read a guest made while booting, in order.

Format (one request a line, decimal): ``time_s offset length``, where
``time_s`` is when the request arrived, counted from the first request.
Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import IO

from bootcache.errors import BootcacheError


@dataclass(frozen=True)
class Request:
    time: float
    offset: int
    length: int


@dataclass
class Trace:
    requests: list[Request]
    name: str = "trace"

    @property
    def duration(self) -> float:
        return self.requests[-1].time if self.requests else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.requests)

    @property
    def end(self) -> int:
        return max((r.offset + r.length for r in self.requests), default=0)

    def distinct_bytes(self, granularity: int) -> int:
        """Bytes of the distinct ``granularity``-aligned blocks the trace touches."""
        return len(self.blocks(granularity)) * granularity

    def blocks(self, granularity: int) -> set[int]:
        out: set[int] = set()
        for r in self.requests:
            out.update(range(r.offset // granularity,
                             (r.offset + r.length - 1) // granularity + 1))
        return out


def parse(text: str, name: str = "trace") -> Trace:
    reqs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            t, off, ln = float(parts[0]), int(parts[1]), int(parts[2])
        except (IndexError, ValueError) as e:
            raise BootcacheError(f"{name}:{lineno}: expected 'time_s offset length'") from e
        if off < 0 or ln <= 0 or t < 0:
            raise BootcacheError(f"{name}:{lineno}: negative offset, time or empty read")
        reqs.append(Request(t, off, ln))
    if not reqs:
        raise BootcacheError(f"{name}: no requests")
    return Trace(reqs, name)


def load(path: str) -> Trace:
    with open(path) as f:
        return parse(f.read(), path)


def debian12() -> Trace:
    """The boot trace shipped with bootcache (Debian 12 minbase, QEMU virtio-blk, TCG)."""
    text = resources.files("bootcache.storm").joinpath("debian12-minbase-boot.trace").read_text()
    return parse(text, "debian12-minbase-boot.trace")


class TraceWriter:
    """Appends requests to a trace file as they happen (flushed per line)."""

    def __init__(self, out: IO[str], comment: str = "") -> None:
        self.out = out
        self.start: float | None = None
        out.write("# time_s offset length" + (f"  ({comment})" if comment else "") + "\n")

    def read(self, offset: int, length: int) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        self.out.write(f"{now - self.start:.6f} {offset} {length}\n")
        self.out.flush()
