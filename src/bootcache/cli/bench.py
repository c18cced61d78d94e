"""``bootcache bench bootstorm`` and ``bootcache trace record|replay``."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from bootcache.storm import trace as tracemod


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers separated by commas") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers separated by commas") from None


def _configs(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(text.split(","))
    unknown = set(chosen) - set(known)
    if unknown:
        raise click.BadParameter(f"unknown configurations: {', '.join(sorted(unknown))}")
    return chosen


@click.group()
def bench() -> None:
    """Benchmarks."""


@bench.command()
@click.option("--quick", is_flag=True, help="A few seconds: N=1,4, pure I/O, four configurations.")
@click.option("-n", "ns", help="VM counts, e.g. 1,2,4,8,16,32,64.")
@click.option("--gaps", help="Gap scales, e.g. 0,0.5 (0 = pure I/O).")
@click.option("--configs", help="Configurations, comma-separated (default: all).")
@click.option("--rate", default="1G", show_default=True, help="Link rate, bits/s (nbdkit rate=).")
@click.option("--trace", "trace_path",
              help="Boot trace: a shipped one by name ("
              + ", ".join(tracemod.SHIPPED) + ") or a trace file's path "
              "(default: debian12-minbase).")
@click.option("--verify", type=click.Choice(["all", "sample"]), default="sample",
              show_default=True, help="Check every replayed read, or a sample.")
@click.option("--runs", default=1, show_default=True,
              help="Run every storm this many times and report medians.")
@click.option("--out", "outdir", default="bench/out", show_default=True)
def bootstorm(quick: bool, ns: str | None, gaps: str | None, configs: str | None, rate: str,
              trace_path: str | None, verify: str, runs: int, outdir: str) -> None:
    """N VMs booting at once from one remote base, with and without caches."""
    from bootcache.storm import bench as storm

    tr = tracemod.load_named(trace_path) if trace_path else tracemod.debian12()
    s = storm.Settings(trace=tr, rate=rate, verify=verify, runs=max(runs, 1))
    if quick:
        s.ns, s.gap_scales, s.configs, s.verify = (1, 4), (0.0,), storm.QUICK_CONFIGS, "all"
    if ns:
        s.ns = _ints(ns)
    if gaps:
        s.gap_scales = _floats(gaps)
    if configs:
        s.configs = _configs(configs, storm.CONFIGS)
    sys.exit(storm.main(s, outdir))


@bench.command()
@click.option("-k", "k", default=8, show_default=True, help="Compute nodes (network namespaces).")
@click.option("-m", "m", default=8, show_default=True, help="VMs booting on each node.")
@click.option("--gap-scale", default=0.5, show_default=True,
              help="Guest think time: the trace's gaps times this (0 = pure I/O).")
@click.option("--rate", default="1gbit", show_default=True, help="Each node's link (tc rate).")
@click.option("--configs", help="Configurations, comma-separated (default: all).")
@click.option("--trace", "trace_path",
              help="Boot trace: a shipped one by name (" + ", ".join(tracemod.SHIPPED)
              + ") or a trace file's path (default: debian12-minbase).")
@click.option("--out", "outdir", default="bench/out", show_default=True)
@click.option("--workdir", help="Keep images, logs and the S3 data here (default: a temporary "
              "folder, removed at the end).")
def fleet(k: int, m: int, gap_scale: float, rate: str, configs: str | None,
          trace_path: str | None, outdir: str, workdir: str | None) -> None:
    """K compute nodes x M VMs booting from one S3 storage node (needs root)."""
    from bootcache.storm import fleet as fleetmod

    tr = tracemod.load_named(trace_path) if trace_path else tracemod.debian12()
    s = fleetmod.Settings(trace=tr, k=k, m=m, gap_scale=gap_scale, rate=rate, workdir=workdir)
    if configs:
        s.configs = _configs(configs, fleetmod.CONFIGS)
    sys.exit(fleetmod.main(s, outdir))


@click.group()
def trace() -> None:
    """Record and replay boot traces."""


@trace.command()
@click.option("--socket", "socket_path", required=True, help="Serve on this UNIX socket.")
@click.option("-o", "--output", required=True, help="Trace file to write.")
@click.argument("image", metavar="IMAGE[=NAME]")
def record(socket_path: str, output: str, image: str) -> None:
    """Serve IMAGE as NAME (as ``serve`` does) and record every read into a trace.

    Boot a guest from nbd+unix:///NAME?socket=SOCKET; stop with SIGTERM or Ctrl-C.
    """
    from bootcache.block.graph import NodeGraph
    from bootcache.cli.serve import parse_image_arg
    from bootcache.layers.chain import ChainPolicy, open_node
    from bootcache.layers.trace import TraceLayer
    from bootcache.nbd.server import NBDServer, close_layers

    image, name = parse_image_arg(image)

    async def main() -> None:
        with open(output, "w") as out:
            writer = tracemod.TraceWriter(out, f"recorded from {image}")
            node = await open_node(image, NodeGraph(), policy=ChainPolicy.from_env())
            layer = TraceLayer(node, writer.read)
            server = NBDServer({name: layer})
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await server.listen_unix(socket_path, 0o600)
            click.echo(f"recording reads of nbd+unix:///{name}?socket={socket_path} "
                       f"into {output}", err=True)
            try:
                await stop.wait()
            finally:
                await server.shutdown()
                await close_layers([layer])

    asyncio.run(main())


@trace.command(help="Print TRACE's totals: reads, MiB read, distinct MiB, request sizes.\n\n"
               "TRACE is a trace file or a shipped trace's name ("
               + ", ".join(tracemod.SHIPPED) + ").")
@click.argument("trace_path", metavar="TRACE")
def stats(trace_path: str) -> None:
    for line in tracemod.describe(tracemod.load_named(trace_path)):
        click.echo(line)


@trace.command()
@click.argument("uri")
@click.argument("trace_path", metavar="TRACE")
@click.option("-n", "n", default=1, show_default=True, help="Simulated VMs.")
@click.option("--gap-scale", default=0.0, show_default=True,
              help="Scale of the recorded gaps between reads (0 = pure I/O).")
def replay(uri: str, trace_path: str, n: int, gap_scale: float) -> None:
    """Replay TRACE (a file or a shipped trace's name) against the NBD export URI
    from N simulated VMs at once."""
    from bootcache.storm.replay import replay_storm

    tr = tracemod.load_named(trace_path)
    results = asyncio.run(replay_storm(uri, tr, n, gap_scale=gap_scale))
    times = sorted(r.seconds for r in results)
    click.echo(f"{n} VMs: slowest {times[-1]:.3f} s, fastest {times[0]:.3f} s, "
               f"mean {sum(times) / n:.3f} s, {sum(r.bytes for r in results) / 2**20:.1f} MiB read")


@trace.command("to-profile")
@click.argument("trace_path", metavar="TRACE")
@click.option("-o", "output", required=True, help="Profile file to write (JSON).")
@click.option("--size", required=True, help="Virtual size of the disk the trace was read "
              "from (e.g. 4G).")
@click.option("--cluster-size", default="64K", show_default=True,
              help="Granularity of the profile.")
def to_profile(trace_path: str, output: str, size: str, cluster_size: str) -> None:
    """Convert a boot trace (trace record) into a boot profile: the clusters
    it reads, in the order it first reads them."""
    import os

    from bootcache.cli.images import parse_size
    from bootcache.errors import BootcacheError
    from bootcache.qcow2 import profile_ext

    try:
        prof = tracemod.load_profile(trace_path, parse_size(size), parse_size(cluster_size))
    except BootcacheError as e:
        raise click.ClickException(str(e)) from e
    tmp = output + ".tmp"
    with open(tmp, "w") as f:
        f.write(profile_ext.dumps(prof))
    os.replace(tmp, output)
    click.echo(f"{output}: {prof.clusters} clusters ({prof.bytes} bytes) in "
               f"{len(prof.ranges)} ranges", err=True)


COMMANDS = [bench, trace]
