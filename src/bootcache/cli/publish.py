"""``bootcache cache publish`` and ``bootcache cache pull``: warm caches shared as files."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from bootcache.cli.images import run


@click.command()
@click.option("--level", type=click.IntRange(1, 19), default=3, show_default=True,
              help="zstd compression level.")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="Compression threads (default: one per CPU).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.argument("cache")
@click.argument("dest")
def publish(level: int, threads: int | None, output: str, cache: str, dest: str) -> None:
    """Publish CACHE's data, compressed, to DEST (a path or s3://bucket/key).

    A cache that a daemon serves is published by that daemon (it holds the
    image's lock), through the control socket it links beside the cache."""
    result = _publish_through_daemon(cache, dest, level)
    if result is None:
        from bootcache.publish.publish import publish as do_publish

        result = run(do_publish(cache, dest, level=level, threads=threads)).as_dict()
    if output == "json":
        click.echo(json.dumps(result, indent=4))
        return
    click.echo(f"published {result['clusters']} clusters ({result['raw-bytes']} bytes) as "
               f"{result['artifact-bytes']} bytes ({result['ratio']:.2f}x) to {dest} in "
               f"{result['seconds']:.2f} s")


def _publish_through_daemon(cache: str, dest: str, level: int) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon serves ``cache``."""
    link = cache + ".ctl"
    if not os.path.islink(link):
        return None
    from bootcache.daemon.ctlclient import ControlClient, ControlError
    from bootcache.errors import BootcacheError

    if "://" not in dest:
        dest = os.path.abspath(dest)  # the daemon has a folder of its own
    try:
        # A publish reads and compresses the whole cache: no short timeout.
        return ControlClient(link, timeout=3600).publish(os.path.abspath(cache), dest, level)
    except ControlError as e:
        if e.status in (0, 404):
            return None  # a daemon gone (its link left behind), or not serving it
        raise BootcacheError(f"{cache}: its daemon refused to publish it: {e}") from None


@click.command()
@click.option("-b", "--base", default=None,
              help="The base the new cache names (default: the one it was published with); "
                   "its identity must match the published one.")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="Decompression threads (default: one per CPU).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.argument("src")
@click.argument("cache")
def pull(base: str | None, threads: int | None, output: str, src: str, cache: str) -> None:
    """Make the new cache image CACHE from the published cache SRC (a path,
    http(s):// or s3:// URL): verified, then put in place whole."""
    from bootcache.publish.pull import pull as do_pull

    result = run(do_pull(src, cache, base=base, threads=threads)).as_dict()
    if output == "json":
        click.echo(json.dumps(result, indent=4))
        return
    resumed = f", resumed at byte {result['resumed-from']}" if result["resumed-from"] else ""
    click.echo(f"pulled {result['clusters']} clusters into {cache} in "
               f"{result['seconds']:.2f} s{resumed}")
