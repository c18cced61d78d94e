"""The fleet benchmark: K compute nodes, M VMs each, one S3 storage node.

Each compute node is a network namespace with its own shaped link to the
storage node (storm/netns.py), runs its own ``bootcache serve`` and boots M
VMs that replay a boot trace through it. The base image, and the caches
nodes publish, live in SeaweedFS S3 on the storage node. Configurations:

    no-cache       every VM reads the base from S3 through its node's daemon
    cold           every node starts with an empty cache image
    cold-profile   empty caches created with the trace's boot profile: the
                   daemon prefetches in profile order while the VMs boot
    pulled         node 0 boots cold and publishes its cache to S3; every
                   other node pulls it, then boots

Storage egress is counted on each node's link (bytes the storage node sent,
headers included); "working sets" divides it by the trace's distinct bytes.
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

from bootcache.errors import BootcacheError
from bootcache.storm import netns, nodes
from bootcache.storm.bench import pyplot, run_async
from bootcache.storm.replay import VmResult, replay_storm
from bootcache.storm.s3node import S3Node
from bootcache.storm.trace import Trace

CONFIGS = ("no-cache", "cold", "cold-profile", "pulled")
BUCKET = "fleet"
BASE_KEY = "base.raw"
CACHE_KEY = "published/cache.qcow2"


@dataclass
class Row:
    config: str
    node: int
    vms: int
    boot_max_s: float
    boot_mean_s: float
    egress_bytes: int  # what the boots made the storage node send
    prepare_s: float   # creating or pulling the cache before the boots
    pull_bytes: int = 0  # what pulling the published cache made it send


@dataclass
class Settings:
    trace: Trace
    k: int = 8
    m: int = 8
    gap_scale: float = 0.5
    rate: str = "1gbit"
    quota: int = 256 << 20
    configs: tuple[str, ...] = CONFIGS
    workdir: str | None = None
    progress: Callable[[str], None] = print
    extra: dict[str, str] = field(default_factory=dict)


class Fleet:
    def __init__(self, s: Settings, workdir: str, net: netns.Network, s3: S3Node) -> None:
        self.s, self.dir, self.net, self.s3 = s, workdir, net, s3
        self.base = nodes.SyntheticBase(os.path.join(workdir, "base.raw"), s.trace)
        self.env = {**os.environ, **s3.env(workdir)}
        self.rows: list[Row] = []

    @property
    def base_uri(self) -> str:
        return f"s3://{BUCKET}/{BASE_KEY}"

    def _run(self, argv: list[str], node: netns.Node | None = None) -> None:
        full = [*(node.exec_prefix() if node else ()), *argv]
        proc = subprocess.run(full, capture_output=True, text=True, env=self.env)
        if proc.returncode:
            raise BootcacheError(f"{' '.join(full)} failed: {proc.stderr.strip()[-2000:]}")

    def _bootcache(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bootcache", *args]

    def _cache_path(self, config: str, node: netns.Node) -> str:
        return os.path.join(self.dir, f"{config}-node{node.index}.qcow2")

    def create_cache(self, config: str, node: netns.Node) -> str:
        path = self._cache_path(config, node)
        if os.path.exists(path):
            os.unlink(path)
        argv = self._bootcache("create", "-q", "-f", "qcow2", "--cache-quota", str(self.s.quota),
                               "-b", self.base_uri, "-F", "raw")
        if config == "cold-profile":
            argv += ["--cache-profile", self.profile_path()]
        self._run([*argv, path, str(self.base.size)], node)
        return path

    _profile: str | None = None

    def profile_path(self) -> str:
        """The boot profile made from the trace (what a recorded first boot yields)."""
        if self._profile is None:
            self._profile = os.path.join(self.dir, "boot.profile")
            trace_file = os.path.join(self.dir, "boot.trace")
            with open(trace_file, "w") as f:
                f.writelines(f"{r.time:.6f} {r.offset} {r.length}\n"
                             for r in self.s.trace.requests)
            self._run(self._bootcache("trace", "to-profile", trace_file, "-o", self._profile,
                                      "--size", str(self.base.size)))
        return self._profile

    @contextmanager
    def daemons(self, images: dict[int, str], *,
                read_only: bool = False) -> Iterator[dict[int, str]]:
        """One ``bootcache serve`` per node, inside its namespace; yields NBD URIs."""
        with ExitStack() as stack:
            uris: dict[int, str] = {}
            for i, image in images.items():
                node = self.net.nodes[i]
                sock = os.path.join(self.dir, f"node{i}.sock")
                argv = [*node.exec_prefix(),
                        *self._bootcache("serve", "--socket", sock,
                                         *(["--read-only"] if read_only else []),
                                         f"{image}=boot")]
                proc = nodes.Process(f"bootcache serve (node {i})", argv, sock,
                                     os.path.join(self.dir, f"node{i}.log"))
                with _environ(self.env):
                    proc.start()
                stack.callback(_stop_checked, proc)
                uris[i] = f"nbd+unix:///boot?socket={sock}"
            yield uris

    def egress(self, which: Iterable[int]) -> dict[int, int]:
        return {i: self.net.nodes[i].egress_bytes() for i in which}

    def boot(self, config: str, uris: dict[int, str], before: dict[int, int],
             prepare_s: dict[int, float] | None = None) -> list[Row]:
        """M VMs on every node in ``uris`` at once; one row per node. Egress
        counts from ``before`` (taken before the daemons started: a
        prefetch begins as soon as a daemon opens its cache)."""

        async def all_nodes() -> list[list[VmResult]]:
            return list(await asyncio.gather(*(
                replay_storm(uri, self.s.trace, self.s.m, gap_scale=self.s.gap_scale,
                             expected=self.base.expected, verify="sample")
                for uri in uris.values())))

        results = run_async(all_nodes())
        rows = []
        for (i, _uri), vms in zip(uris.items(), results, strict=True):
            times = [r.seconds for r in vms]
            rows.append(Row(config, i, len(vms), max(times), statistics.fmean(times),
                            self.net.nodes[i].egress_bytes() - before[i],
                            (prepare_s or {}).get(i, 0.0)))
        self.rows.extend(rows)
        self._report(config, rows)
        return rows

    def _report(self, config: str, rows: list[Row]) -> None:
        ws = self.s.trace.distinct_bytes(nodes.BLOCK)
        egress = sum(r.egress_bytes for r in rows)
        slowest = max(r.boot_max_s for r in rows)
        self.s.progress(f"{config:13} nodes {len(rows)}: boot max {slowest:6.2f} s"
                        f" mean {statistics.fmean(r.boot_mean_s for r in rows):6.2f} s, egress "
                        f"{egress / 2**20:8.1f} MiB = {egress / ws:5.2f} working sets")

    def run_config(self, config: str) -> None:
        every = range(self.s.k)
        if config == "no-cache":
            before = self.egress(every)
            with self.daemons({i: self.base_uri for i in every}, read_only=True) as uris:
                self.boot(config, uris, before)
        elif config in ("cold", "cold-profile"):
            images = {i: self.create_cache(config, self.net.nodes[i]) for i in every}
            before = self.egress(every)
            with self.daemons(images) as uris:
                self.boot(config, uris, before)
        elif config == "pulled":
            first = self.net.nodes[0]
            image = self.create_cache(config, first)
            before = self.egress([0])
            with self.daemons({0: image}) as uris:
                self.boot("pulled-first", uris, before)
            self._run(self._bootcache("cache", "publish", image,
                                      f"s3://{BUCKET}/{CACHE_KEY}"), first)
            prepare: dict[int, float] = {}
            images = {}
            before = {i: self.net.nodes[i].egress_bytes() for i in every if i}
            for i in every:
                if i == 0:
                    continue
                node = self.net.nodes[i]
                path = self._cache_path(config, node)
                t0 = time.monotonic()
                self._run(self._bootcache("cache", "pull", f"s3://{BUCKET}/{CACHE_KEY}", path),
                          node)
                prepare[i] = time.monotonic() - t0
                images[i] = path
            pulled = {i: self.net.nodes[i].egress_bytes() - before[i] for i in before}
            before = self.egress(images)
            with self.daemons(images) as uris:
                rows = self.boot(config, uris, before, prepare)
            for r in rows:  # the pull crossed the same link: count it apart
                r.pull_bytes = pulled[r.node]
        else:
            raise BootcacheError(f"unknown fleet configuration {config!r}; "
                                 f"choose from {', '.join(CONFIGS)}")


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    # nodes.Process inherits this process's environment.
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _stop_checked(proc: nodes.Process) -> None:
    rc = proc.stop()
    if rc not in (0, None):
        raise BootcacheError(f"{proc.name} exited with {rc}; see {proc.log}")


def run(settings: Settings) -> list[Row]:
    why = netns.available()
    if why is not None:
        raise BootcacheError(f"the fleet benchmark needs network namespaces: {why}")
    own = settings.workdir is None
    workdir = settings.workdir or tempfile.mkdtemp(prefix="fleet-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        with netns.Network(settings.k, settings.rate) as net:
            s3 = S3Node(workdir, netns.STORAGE_ADDR).start()
            try:
                fleet = Fleet(settings, workdir, net, s3)
                settings.progress(f"writing and uploading the base ({fleet.base.size >> 20} MiB)")
                fleet.base.write()
                run_async(s3.upload(BUCKET, BASE_KEY, fleet.base.path))
                for config in settings.configs:
                    fleet.run_config(config)
                return fleet.rows
            finally:
                s3.stop()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting ------------------------------------------------------------------------

def summary(rows: list[Row], trace: Trace) -> list[dict[str, float | str]]:
    ws = trace.distinct_bytes(nodes.BLOCK)
    out: list[dict[str, float | str]] = []
    for config in dict.fromkeys(r.config for r in rows):
        sel = [r for r in rows if r.config == config]
        sel_egress = sum(r.egress_bytes + r.pull_bytes for r in sel)
        if config == "pulled":  # the whole configuration: the first node's boots too
            sel_egress += sum(r.egress_bytes for r in rows if r.config == "pulled-first")
        out.append({"config": config, "nodes": len(sel),
                    "boot_max_s": max(r.boot_max_s for r in sel),
                    "boot_mean_s": statistics.fmean(r.boot_mean_s for r in sel),
                    "prepare_max_s": max(r.prepare_s for r in sel),
                    "egress_mib": sel_egress / 2**20, "working_sets": sel_egress / ws})
    return out


def markdown(rows: list[Row], s: Settings) -> str:
    lines = [f"Fleet: K={s.k} nodes x M={s.m} VMs, link {s.rate} per node, gaps x{s.gap_scale}, "
             f"trace {s.trace.name} ({s.trace.distinct_bytes(nodes.BLOCK) / 2**20:.1f} MiB "
             "distinct at 64 KiB).", "",
             "| configuration | nodes | boot max | boot mean | cache ready in | storage egress |"
             " working sets |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in summary(rows, s.trace):
        lines.append(f"| {x['config']} | {x['nodes']} | {x['boot_max_s']:.2f} s | "
                     f"{x['boot_mean_s']:.2f} s | {x['prepare_max_s']:.2f} s | "
                     f"{x['egress_mib']:.1f} MiB | {x['working_sets']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[Row], s: Settings, path: str) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    data = summary(rows, s.trace)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [str(x["config"]) for x in data]
    a.bar(names, [float(x["boot_max_s"]) for x in data])
    a.set_ylabel("slowest boot (s)")
    b.bar(names, [float(x["working_sets"]) for x in data])
    b.set_ylabel("storage egress (working sets)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{s.k} nodes x {s.m} VMs, {s.rate} links, gaps x{s.gap_scale}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(settings: Settings, outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    t0 = time.monotonic()
    rows = run(settings)
    with open(os.path.join(outdir, "fleet.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    have_png = plot(rows, settings, os.path.join(outdir, "fleet.png"))
    table = markdown(rows, settings)
    with open(os.path.join(outdir, "fleet.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nresults in {outdir} (fleet.csv, fleet.md{', fleet.png' if have_png else ''}); "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0
