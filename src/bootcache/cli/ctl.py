"""``bootcache ctl``: change and inspect a running daemon through its control socket.

    bootcache ctl [--control PATH] add IMAGE[=NAME] [--read-only]
    bootcache ctl [--control PATH] remove NAME [--force]
    bootcache ctl [--control PATH] list [--output json]
    bootcache ctl [--control PATH] stats [NAME] [--output json]
    bootcache ctl [--control PATH] reload

The control socket defaults to $BOOTCACHE_CONTROL, else
/run/bootcache/bootcache.sock.ctl (``serve --socket S`` listens on S.ctl).
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from bootcache.daemon.ctlclient import ControlClient


def _client(ctx: click.Context) -> ControlClient:
    client: ControlClient = ctx.obj
    return client


@click.group("ctl")
@click.option("--control", "control_path", metavar="PATH", envvar="BOOTCACHE_CONTROL",
              help="The daemon's control socket.")
@click.pass_context
def ctl(ctx: click.Context, control_path: str | None) -> None:
    """Add, remove and inspect the exports of a running daemon."""
    ctx.obj = ControlClient(control_path)


@ctl.command()
@click.argument("image", metavar="IMAGE[=NAME]")
@click.option("--read-only", is_flag=True, help="Clients may not write.")
@click.pass_context
def add(ctx: click.Context, image: str, read_only: bool) -> None:
    """Export IMAGE as NAME (default: its file name without .qcow2)."""
    path, sep, name = image.partition("=")
    if "://" not in path:
        path = os.path.abspath(path)  # the daemon's working folder is not ours
    entry = _client(ctx).add(path, name if sep else None, read_only=read_only)
    click.echo(f"added {entry['name']}: {entry['image']}"
               + (" (read-only)" if entry["read_only"] else ""))


@ctl.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Flush, then disconnect connected clients.")
@click.pass_context
def remove(ctx: click.Context, name: str, force: bool) -> None:
    """Stop exporting NAME (refused while clients are connected, unless --force)."""
    _client(ctx).remove(name, force=force)
    click.echo(f"removed {name}")


@ctl.command("list")
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.pass_context
def list_(ctx: click.Context, output: str) -> None:
    """The exports, their images, state and connected clients."""
    exports = _client(ctx).exports()
    if output == "json":
        click.echo(json.dumps(exports, indent=4))
        return
    for e in exports:
        flags = ", ".join(f for f in ("read-only" if e["read_only"] else "",
                                      e["state"] if e["state"] != "active" else "") if f)
        click.echo(f"{e['name']}: {e['image']} ({e['size']} bytes, "
                   f"{e['connections']} clients{', ' + flags if flags else ''})")


@ctl.command()
@click.argument("name", required=False)
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.pass_context
def stats(ctx: click.Context, name: str | None, output: str) -> None:
    """Counters of every export (or of NAME): reads, latency, its caches."""
    data = _client(ctx).stats(name)
    if output == "json":
        click.echo(json.dumps(data, indent=4))
        return
    exports = {name: data} if name else data["exports"]
    for export, s in exports.items():
        click.echo(f"{export}: {s['reads']} reads, {s['read_bytes']} bytes, "
                   f"{s['read_errors']} errors, {s['connections']} clients")
        for image, c in s.get("caches", {}).items():
            click.echo(f"  cache {image}: " + _cache_line(c))


def _cache_line(c: dict[str, Any]) -> str:
    return (f"{c['hits']} hits, {c['misses']} misses, {c['bytes_from_base']} bytes from base, "
            f"{c['used_bytes']} of {c['quota']} bytes used, "
            f"{c.get('prefetched_bytes', 0)} bytes prefetched, "
            f"{c.get('prefetch_hits', 0)} hits on prefetched clusters")


@ctl.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Reread the daemon's --config file and apply the catalog's changes."""
    click.echo(json.dumps(_client(ctx).reload(), indent=4))


COMMANDS = [ctl]
