"""Boot traces: every read a guest made while booting, in order.

Format (one request a line, decimal): ``time_s offset length``, where
``time_s`` is when the request arrived, counted from the first request.
Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import IO, TYPE_CHECKING

from bootcache.errors import BootcacheError

if TYPE_CHECKING:
    from bootcache.qcow2 import profile_ext


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


    def size_histogram(self) -> list[tuple[int, int]]:
        """(request length, count) pairs, the most frequent length first."""
        counts: dict[int, int] = {}
        for r in self.requests:
            counts[r.length] = counts.get(r.length, 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


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


# The boot traces shipped with bootcache, by name (files in this package).
SHIPPED = {
    # Debian 12 minbase, -kernel/-initrd, root=/dev/vda: the default.
    "debian12-minbase": "debian12-minbase-boot.trace",
    # Debian 12 with ssh, cron, networking, a persistent journal, booting
    # through its own GRUB from a partitioned disk.
    "debian12-services": "debian12-services-boot.trace",
}


def shipped(name: str) -> Trace:
    """A shipped boot trace by its name in ``SHIPPED``."""
    try:
        filename = SHIPPED[name]
    except KeyError:
        raise BootcacheError(f"no shipped trace {name!r} (shipped: "
                             f"{', '.join(SHIPPED)})") from None
    text = resources.files("bootcache.storm").joinpath(filename).read_text()
    return parse(text, filename)


def load_named(spec: str) -> Trace:
    """A shipped trace's name, or else the path of a trace file."""
    if spec in SHIPPED:
        return shipped(spec)
    try:
        return load(spec)
    except OSError as e:
        raise BootcacheError(f"{spec}: {e.strerror} (not a trace file, nor a shipped "
                             f"trace: {', '.join(SHIPPED)})") from None


def debian12() -> Trace:
    """The default shipped boot trace (Debian 12 minbase, QEMU virtio-blk, TCG)."""
    return shipped("debian12-minbase")


def describe(trace: Trace, top: int = 6) -> list[str]:
    """The totals the traces' README gives for each trace, one a line."""
    mib = 2**20
    hist = trace.size_histogram()
    sizes = ", ".join(f"{_size(n)} ({c})" for n, c in hist[:top])
    if len(hist) > top:
        sizes += f", and {len(hist) - top} other sizes ({sum(c for _, c in hist[top:])})"
    return [
        f"{trace.name}: {len(trace.requests)} reads over {trace.duration:.1f} s",
        f"read: {trace.total_bytes / mib:.1f} MiB",
        f"distinct: {trace.distinct_bytes(4096) / mib:.1f} MiB at 4 KiB, "
        f"{trace.distinct_bytes(65536) / mib:.1f} MiB at 64 KiB",
        f"highest offset read: {trace.end / mib:.1f} MiB",
        f"request sizes: {sizes}",
    ]


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B"


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


def load_profile(path: str, virtual_size: int, cluster_size: int) -> profile_ext.Profile:
    """A boot profile from a profile file (JSON, as ``cache profile -o``
    writes) or a boot trace (``trace record``), for a disk of ``virtual_size``."""
    from bootcache.qcow2 import profile_ext

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise profile_ext.ProfileError(f"{path}: cannot read the profile: {e}") from e
    if text.lstrip().startswith("{"):
        return profile_ext.from_json_text(text, path, virtual_size, cluster_size)
    tr = parse(text, path)
    return profile_ext.from_byte_ranges(((r.offset, r.length) for r in tr.requests),
                                        virtual_size, cluster_size, what=path)
