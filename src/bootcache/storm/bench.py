"""The boot-storm benchmark: N VMs booting at once from one remote base.

Configurations, all measured in one run against the same storage node and
link (nbdkit with the rate filter):

    no-cache           VMs read the base over the link (QEMU overlays straight
                       on the storage node)
    nbdkit-cache       nbdkit's cache filter (cache-on-read) on the compute node
    bootcache-cold     bootcache serve with an empty cache image
    bootcache-cold+profile
                       an empty cache image created with the trace's boot profile:
                       the daemon prefetches it while the VMs boot (issue 12)
    bootcache-cold+other-profile
                       an empty cache image whose profile names as many clusters
                       the trace never reads: the prefetch is pure background
                       load on the link, to show it does not slow demand reads
    bootcache-warm     the same daemon again, cache filled by the cold storm
    bootcache-restart  a new daemon on the warm cache image
    bootcache-storage  the cache image on the storage node, behind the link

For each configuration and N, every VM replays the boot trace; the table
reports the time until all N have booted, the bytes that crossed the link and
the mean and 90th percentile time of one read; with ``runs`` > 1, each is the
median over the runs.
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from bootcache.errors import BootcacheError
from bootcache.storm import nodes
from bootcache.storm.replay import replay_storm
from bootcache.storm.trace import Trace

CONFIGS = ("no-cache", "nbdkit-cache", "bootcache-cold", "bootcache-cold+profile",
           "bootcache-cold+other-profile", "bootcache-warm", "bootcache-restart",
           "bootcache-storage")
T = TypeVar("T")
QUICK_CONFIGS = ("no-cache", "bootcache-cold", "bootcache-warm", "bootcache-restart")


@dataclass
class Row:
    config: str
    gap_scale: float
    n: int
    boot_max_s: float
    boot_mean_s: float
    link_bytes: int
    reads_verified: int
    read_mean_ms: float = 0.0
    read_p90_ms: float = 0.0


@dataclass
class Settings:
    trace: Trace
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    gap_scales: tuple[float, ...] = (0.0, 0.5)
    configs: tuple[str, ...] = CONFIGS
    rate: str = "1G"
    quota: int = 256 << 20
    verify: str = "sample"
    workdir: str | None = None
    progress: Callable[[str], None] = print
    #: Each storm is run this many times; rows report medians.
    runs: int = 1


class Storm:
    """Runs the configurations; owns the processes and the work folder."""

    def __init__(self, s: Settings, workdir: str) -> None:
        self.s = s
        self.dir = workdir
        self.base = nodes.SyntheticBase(os.path.join(workdir, "base.raw"), s.trace)
        self.rows: list[Row] = []
        self.profile = os.path.join(workdir, "boot.profile")
        self.other_profile = os.path.join(workdir, "other.profile")

    def _write_profiles(self) -> None:
        """The trace's boot profile, and one of as many clusters it never reads."""
        from bootcache.qcow2 import profile_ext

        reqs = self.s.trace.requests
        own = profile_ext.from_byte_ranges(((r.offset, r.length) for r in reqs),
                                           self.base.size, nodes.BLOCK)
        with open(self.profile, "w") as f:
            f.write(profile_ext.dumps(own))
        total = self.base.size // nodes.BLOCK
        # The same number of clusters, in a trace-like pattern, none of them the trace's.
        others = [b for b in range(total // 2, total) if b not in self.base.block_set]
        other = profile_ext.from_byte_ranges(
            ((b * nodes.BLOCK, nodes.BLOCK) for b in others[:own.clusters]),
            self.base.size, nodes.BLOCK)
        with open(self.other_profile, "w") as f:
            f.write(profile_ext.dumps(other))

    def run(self) -> list[Row]:
        self._write_profiles()
        for i in range(self.s.runs):
            # Every other run takes the configurations in reverse order: the
            # first storm of a run is slower whatever its configuration (a
            # fresh base file, cold page cache), which would otherwise always
            # count against the same configuration.
            self._run_once(reverse=i % 2 == 1)
        return _medians(self.rows)

    def _run_once(self, reverse: bool = False) -> None:
        self.s.progress(f"writing the base ({self.base.size >> 20} MiB sparse, "
                        f"{len(self.base.blocks) * nodes.BLOCK >> 20} MiB of data)")
        self.base.write()
        link = nodes.Link(self.dir, ["file", self.base.path], self.s.rate).start()
        try:
            for config in (reversed(self.s.configs) if reverse else self.s.configs):
                if config != "bootcache-storage":
                    self._run_config(config, link)
        finally:
            link.stop()
        if "bootcache-storage" in self.s.configs:
            self._run_storage_side()

    # One storm: N VMs at one gap scale, link bytes counted around it.
    def _storm(self, config: str, uri: str, n: int, gap: float, link: nodes.Link,
               mark: bool = True) -> Row:
        if mark:
            link.mark()
        results = run_async(replay_storm(uri, self.s.trace, n, gap_scale=gap,
                                          expected=self.base.expected, verify=self.s.verify))
        lat = sorted(t for r in results for t in r.latencies)
        row = Row(config, gap, n, max(r.seconds for r in results),
                  sum(r.seconds for r in results) / n, link.bytes_since_mark(),
                  sum(r.verified for r in results), 1000 * sum(lat) / len(lat),
                  1000 * lat[int(0.9 * (len(lat) - 1))])
        self.rows.append(row)
        self.s.progress(f"{config:18} gap x{gap:<4} N={n:<3} boot {row.boot_max_s:7.2f} s "
                        f"(mean {row.boot_mean_s:6.2f}) link {row.link_bytes / 2**20:8.1f} MiB "
                        f"read {row.read_mean_ms:6.3f} ms (p90 {row.read_p90_ms:6.3f})")
        return row

    def _run_config(self, config: str, link: nodes.Link) -> None:
        for gap in self.s.gap_scales:
            for n in self.s.ns:
                if config == "no-cache":
                    self._storm(config, link.uri, n, gap, link)
                elif config == "nbdkit-cache":
                    node = nodes.nbdkit_cache_node(self.dir, link.sock).start()
                    try:
                        self._storm(config, f"nbd+unix:///?socket={node.sock}", n, gap, link)
                    finally:
                        node.stop()
                elif config == "bootcache-cold":
                    with self._daemon(link.uri, fresh=True) as uri:
                        self._storm(config, uri, n, gap, link)
                elif config in ("bootcache-cold+profile", "bootcache-cold+other-profile"):
                    profile = self.profile if config == "bootcache-cold+profile" \
                        else self.other_profile
                    # The daemon starts prefetching when it opens the cache; the
                    # VMs start booting as soon as it serves, as on a real node.
                    link.mark()
                    with self._daemon(link.uri, fresh=True, profile=profile,
                                      name="profiled") as uri:
                        self._storm(config, uri, n, gap, link, mark=False)
                elif config == "bootcache-warm":
                    with self._daemon(link.uri, fresh=not self._warm_ready) as uri:
                        if not self._warm_ready:
                            self._warm(uri, link)
                        self._storm(config, uri, n, gap, link)
                elif config == "bootcache-restart":
                    if not self._warm_ready:
                        with self._daemon(link.uri, fresh=True) as uri:
                            self._warm(uri, link)
                    with self._daemon(link.uri, fresh=False) as uri:
                        self._storm(config, uri, n, gap, link)

    _warm_ready = False

    def _warm(self, uri: str, link: nodes.Link) -> None:
        """One untimed boot fills the cache (what the first boot on a node does)."""
        run_async(replay_storm(uri, self.s.trace, 1, expected=self.base.expected))
        self._warm_ready = True

    @contextmanager
    def _daemon(self, base_uri: str, *, fresh: bool, name: str = "compute",
                profile: str | None = None) -> Iterator[str]:
        cache = os.path.join(self.dir, f"{name}-cache.qcow2")
        if fresh:
            nodes.create_cache(cache, base_uri, self.s.quota, self.base.size, profile=profile)
            if name == "compute":
                self._warm_ready = False
        daemon = nodes.bootcache_serve(self.dir, name, cache).start()
        try:
            yield f"nbd+unix:///boot?socket={daemon.sock}"
        finally:
            rc = daemon.stop()
            if rc not in (0, None):
                raise BootcacheError(f"bootcache serve exited with {rc}")

    def _run_storage_side(self) -> None:
        """The cache on the storage node: VMs still cross the link for every read."""
        with self._daemon(self.base.path, fresh=True, name="storage") as uri:
            sock = uri.split("socket=", 1)[1]
            link = nodes.Link(os.path.join(self.dir), ["nbd", f"socket={sock}",
                                                       "export=boot"], self.s.rate)
            link.logfile = os.path.join(self.dir, "link-storage.log")
            link.process.argv = [a if not a.startswith("logfile=") else
                                 f"logfile={link.logfile}" for a in link.process.argv]
            link.start()
            try:
                run_async(replay_storm(link.uri, self.s.trace, 1,
                                        expected=self.base.expected))  # warm it
                for gap in self.s.gap_scales:
                    for n in self.s.ns:
                        self._storm("bootcache-storage", link.uri, n, gap, link)
            finally:
                link.stop()


def _medians(rows: list[Row]) -> list[Row]:
    """One row per (config, gap, N): the median of each measure over the runs."""
    groups: dict[tuple[str, float, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.config, r.gap_scale, r.n), []).append(r)
    out = []
    for (config, gap, n), rs in groups.items():
        out.append(Row(config, gap, n, statistics.median(r.boot_max_s for r in rs),
                       statistics.median(r.boot_mean_s for r in rs),
                       int(statistics.median(r.link_bytes for r in rs)),
                       min(r.reads_verified for r in rs),
                       statistics.median(r.read_mean_ms for r in rs),
                       statistics.median(r.read_p90_ms for r in rs)))
    return out


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def run(settings: Settings) -> list[Row]:
    for tool in ("nbdkit",):
        nodes.need(tool)
    own = settings.workdir is None
    workdir = settings.workdir or tempfile.mkdtemp(prefix="bootstorm-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        return Storm(settings, workdir).run()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting ------------------------------------------------------------------------

def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def markdown(rows: list[Row], trace: Trace) -> str:
    """One table per gap scale: boot time by N, t(Nmax)/t(1), link bytes at Nmax."""
    out = []
    distinct = trace.distinct_bytes(nodes.BLOCK)
    for gap in sorted({r.gap_scale for r in rows}):
        sel = [r for r in rows if r.gap_scale == gap]
        ns = sorted({r.n for r in sel})
        label = "pure I/O" if gap == 0 else f"gaps x{gap} (guest CPU time modelled)"
        out.append(f"Boot time of the slowest of N VMs, {label}:\n")
        out.append("| configuration | " + " | ".join(f"N={n}" for n in ns)
                   + f" | t({ns[-1]})/t(1) | link MiB at N={ns[-1]} |")
        out.append("| --- | " + " | ".join("---:" for _ in ns) + " | ---: | ---: |")
        for config in dict.fromkeys(r.config for r in sel):
            by_n = {r.n: r for r in sel if r.config == config}
            times = " | ".join(f"{by_n[n].boot_max_s:.2f} s" if n in by_n else "-" for n in ns)
            ratio = by_n[ns[-1]].boot_max_s / by_n[ns[0]].boot_max_s \
                if ns[-1] in by_n and ns[0] in by_n else float("nan")
            link = by_n[ns[-1]].link_bytes / 2**20 if ns[-1] in by_n else float("nan")
            out.append(f"| {config} | {times} | {ratio:.2f} | {link:.1f} |")
        out.append("")
    lat = [r for r in rows if r.read_mean_ms]
    if any(r.config.startswith("bootcache-cold") for r in lat):
        out.append("Time of one read (mean / 90th percentile, ms), by configuration:\n")
        keys = sorted({(r.gap_scale, r.n) for r in lat})
        out.append("| configuration | " + " | ".join(
            f"{'pure I/O' if g == 0 else f'gaps x{g}'} N={n}" for g, n in keys) + " |")
        out.append("| --- | " + " | ".join("---:" for _ in keys) + " |")
        for config in dict.fromkeys(r.config for r in lat):
            by = {(r.gap_scale, r.n): r for r in lat if r.config == config}
            out.append(f"| {config} | " + " | ".join(
                f"{by[k].read_mean_ms:.3f} / {by[k].read_p90_ms:.3f}" if k in by else "-"
                for k in keys) + " |")
        out.append("")
    out.append(f"Trace: {trace.name}, {len(trace.requests)} reads, "
               f"{trace.total_bytes / 2**20:.1f} MiB read, "
               f"{distinct / 2**20:.1f} MiB distinct at 64 KiB.")
    return "\n".join(out)


def check_goals(rows: list[Row], trace: Trace) -> list[str]:
    """The issue's goals, each as 'PASS ...' or 'FAIL ...'."""
    out = []
    distinct = trace.distinct_bytes(nodes.BLOCK)

    def get(config: str, n: int, gap: float) -> Row | None:
        return next((r for r in rows if (r.config, r.n, r.gap_scale) == (config, n, gap)), None)

    gaps = sorted({r.gap_scale for r in rows})
    gap = gaps[-1]
    ns = sorted({r.n for r in rows})
    lo, hi = ns[0], ns[-1]
    for config, limit in (("bootcache-warm", 1.1), ("bootcache-restart", 1.1),
                          ("bootcache-cold", 1.5)):
        a, b = get(config, lo, gap), get(config, hi, gap)
        if a and b and gap == 0:
            # With no guest think time, N replaying clients on this machine's
            # two cores measure CPU, not boot storms: the goals are for boots.
            out.append(f"n/a {config}: t({hi})/t({lo}) = {b.boot_max_s / a.boot_max_s:.2f} "
                       "(pure I/O only; the goal applies to boots with think time)")
        elif a and b:
            ratio = b.boot_max_s / a.boot_max_s
            out.append(f"{'PASS' if ratio <= limit else 'FAIL'} {config}: t({hi})/t({lo}) = "
                       f"{ratio:.2f} (goal <= {limit}, gaps x{gap})")
    for r in rows:
        if r.config == "bootcache-cold" and r.link_bytes > 1.05 * distinct:
            out.append(f"FAIL bootcache-cold N={r.n}: {r.link_bytes} bytes over the link > "
                       f"1.05 x {distinct}")
            break
    else:
        if any(r.config == "bootcache-cold" for r in rows):
            worst = max(r.link_bytes for r in rows if r.config == "bootcache-cold")
            out.append(f"PASS bootcache-cold: at most {worst / 2**20:.1f} MiB over the link "
                       f"(goal <= 1.05 x {distinct / 2**20:.1f} MiB)")
    for config in ("bootcache-warm", "bootcache-restart"):
        touched = [r for r in rows if r.config == config and r.link_bytes]
        if any(r.config == config for r in rows):
            out.append(f"{'FAIL' if touched else 'PASS'} {config}: "
                       f"{'touched' if touched else 'never touched'} the base during storms")
    out.extend(_profile_goals(rows, distinct))
    w, k = get("bootcache-warm", hi, gap), get("nbdkit-cache", hi, gap)
    if w and k:
        out.append(f"{'PASS' if w.boot_max_s <= k.boot_max_s else 'FAIL'} warm N={hi}: "
                   f"{w.boot_max_s:.2f} s vs nbdkit cache filter {k.boot_max_s:.2f} s")
    return out


def _profile_goals(rows: list[Row], distinct: int) -> list[str]:
    """Issue 12: a cold node with a profile boots within 1.2x the warm boot and
    pulls at most 1.05x the working set; an unrelated prefetch leaves demand
    reads within 10% of their time without it."""
    out = []
    by = {(r.config, r.gap_scale, r.n): r for r in rows}
    for (config, gap, n), r in sorted(by.items()):
        if config != "bootcache-cold+profile":
            continue
        warm = by.get(("bootcache-warm", gap, n))
        if warm is not None and gap > 0:
            ratio = r.boot_max_s / warm.boot_max_s
            out.append(f"{'PASS' if ratio <= 1.2 else 'FAIL'} cold+profile N={n} gaps x{gap}: "
                       f"{r.boot_max_s:.2f} s = {ratio:.3f} x warm {warm.boot_max_s:.2f} s "
                       "(goal <= 1.2)")
        ratio = r.link_bytes / distinct
        out.append(f"{'PASS' if ratio <= 1.05 else 'FAIL'} cold+profile N={n} gaps x{gap}: "
                   f"{r.link_bytes / 2**20:.1f} MiB over the link = {ratio:.3f} x the working "
                   "set (goal <= 1.05)")
    for (config, gap, n), r in sorted(by.items()):
        cold = by.get(("bootcache-cold", gap, n))
        if config != "bootcache-cold+other-profile" or cold is None:
            continue
        ratio = r.read_mean_ms / cold.read_mean_ms
        out.append(f"{'PASS' if ratio <= 1.1 else 'FAIL'} demand reads with an unrelated "
                   f"prefetch running, N={n} gaps x{gap}: mean {r.read_mean_ms:.3f} ms = "
                   f"{ratio:.3f} x without ({cold.read_mean_ms:.3f} ms; goal <= 1.1)")
    return out


def pyplot(path: str) -> Any:
    """matplotlib's pyplot for drawing ``path``, or None (said on stderr) when
    matplotlib, the optional "bench" extra a node install goes without, is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot ({os.path.basename(path)}): matplotlib is not installed; "
              "install it with: pip install 'bootcache[bench]'", file=sys.stderr)
        return None
    return plt


def plot(rows: list[Row], path: str) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    gaps = sorted({r.gap_scale for r in rows})
    fig, axes = plt.subplots(1, len(gaps), figsize=(6 * len(gaps), 4.5), squeeze=False)
    for ax, gap in zip(axes[0], gaps, strict=True):
        for config in dict.fromkeys(r.config for r in rows):
            sel = sorted((r for r in rows if r.config == config and r.gap_scale == gap),
                         key=lambda r: r.n)
            ax.plot([r.n for r in sel], [r.boot_max_s for r in sel], marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("VMs booting at once (N)")
        ax.set_ylabel("time until all N booted (s)")
        ax.set_title("pure I/O" if gap == 0 else f"guest think time x{gap}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(settings: Settings, outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    t0 = time.monotonic()
    rows = run(settings)
    write_csv(rows, os.path.join(outdir, "bootstorm.csv"))
    have_png = plot(rows, os.path.join(outdir, "bootstorm.png"))
    table = markdown(rows, settings.trace)
    with open(os.path.join(outdir, "bootstorm.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n")
    goals = check_goals(rows, settings.trace)
    print("\n".join(goals))
    print(f"\nresults in {outdir} (bootstorm.csv, bootstorm.md"
          f"{', bootstorm.png' if have_png else ''}); {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    return 0
