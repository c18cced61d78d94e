"""``bootcache cache ...``: commands about cache images."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from bootcache.cli.images import INFO_HOOKS, run
from bootcache.errors import ImageFormatError
from bootcache.layers.cache import read_extension
from bootcache.qcow2 import cache_ext
from bootcache.qcow2.format import AUTOCLEAR_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource


def cache_facts(img: Qcow2Image) -> dict[str, Any] | None:
    ext = read_extension(img)
    if ext is None:
        return None
    facts: dict[str, Any] = {
        "quota": ext.quota,
        "policy": cache_ext.POLICY_NAMES[ext.policy],
        "on-stale": cache_ext.ON_STALE_NAMES[ext.on_stale],
        "used": ext.used_bytes,
        "consistent": bool(img.header.autoclear_features & AUTOCLEAR_CACHE),
        "base-identity": ext.identity,
    }
    if ext.policy == cache_ext.POLICY_LRU:
        facts["high-watermark"] = ext.high_watermark
        facts["low-watermark"] = ext.low_watermark
    return facts


def _info_hook(img: Qcow2Image, info: dict[str, Any]) -> None:
    facts = cache_facts(img)
    if facts is not None:
        info["cache"] = facts


INFO_HOOKS.append(_info_hook)


async def read_stats(path: str) -> dict[str, Any]:
    # The daemon holds the cache for writing; reading its header needs no lock.
    source = FileSource(path, lock=False)
    try:
        img = await Qcow2Image.open(source, name=path)
        ext = read_extension(img)
        if ext is None:
            raise ImageFormatError(f"{path}: not a cache image")
        stats: dict[str, Any] = {"filename": path, **ext.counters(), "quota": ext.quota,
                                 "policy": cache_ext.POLICY_NAMES[ext.policy]}
        live = read_live_stats(path)
        if live is not None:
            # A running daemon's counters are newer than the ones it last saved.
            stats.update(live)
        return stats
    finally:
        await source.close()


def read_live_stats(path: str) -> dict[str, Any] | None:
    """Counters of the daemon serving ``path``, if one is: it leaves
    ``PATH.ctl``, a link to its control socket, beside each cache it holds."""
    from bootcache.daemon.ctlclient import ControlClient, ControlError

    link = path + ".ctl"
    if not os.path.islink(link):
        return None
    try:
        live = ControlClient(link, timeout=5).node(path)
    except ControlError:
        return None  # a daemon that stopped without removing its link
    live["live-from"] = os.path.realpath(link)
    return live


@click.group()
def cache() -> None:
    """Inspect cache images."""


@cache.command()
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.argument("filename")
def stats(output: str, filename: str) -> None:
    """Hit and miss counters, bytes moved, quota and use of a cache image."""
    data = run(read_stats(filename))
    if output == "json":
        click.echo(json.dumps(data, indent=4))
        return
    for key, value in data.items():
        click.echo(f"{key.replace('_', ' ')}: {value}")


COMMANDS = [cache]
