"""``bootcache cache ...``: commands about cache images."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from bootcache.cli.images import CHECK_HOOKS, INFO_HOOKS, run
from bootcache.errors import ImageFormatError
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

if TYPE_CHECKING:
    from bootcache.qcow2.check import CheckResult


def _name(names: dict[int, str], value: int) -> str:
    return names.get(value, f"unknown ({value})")


async def cache_facts(img: Qcow2Image, warnings: list[str]) -> dict[str, Any] | None:
    """What ``info`` says about a cache image (None: not one), noting on the
    way what a reader following the spec would object to."""
    raw = img.header.find_extension(EXT_CACHE)
    if raw is None:
        return None
    # Imported once an image has the extension: info on a plain qcow2 skips it.
    from bootcache.qcow2 import cache_ext

    if img.header.backing_file is None:
        warnings.append("the image has a cache extension but no backing file: "
                        "it is not a cache and the extension is ignored")
        return None
    try:
        ext = cache_ext.CacheExtension.decode(raw.data, strict=False)
    except ImageFormatError as e:
        # Still a valid qcow2 (spec section 2): shown as one, with the reason.
        warnings.append(f"{e}; shown as a plain qcow2 image")
        return None
    # The recorded use is advisory: the L2 tables are the truth.
    used = len(await img.allocated_clusters()) * img.cs
    facts: dict[str, Any] = {
        "quota": ext.quota,
        "policy": _name(cache_ext.POLICY_NAMES, ext.policy),
        "on-stale": _name(cache_ext.ON_STALE_NAMES, ext.on_stale),
        "used": used,
        "consistent": bool(img.header.autoclear_features & AUTOCLEAR_CACHE),
        "base-identity": ext.identity,
    }
    if ext.used_bytes != used:
        facts["used-recorded"] = ext.used_bytes
        warnings.append(f"the cache extension records used_bytes={ext.used_bytes}, but the "
                        f"L2 tables hold {used} bytes of cached data; {used} is the real use")
    if ext.policy == cache_ext.POLICY_LRU:
        facts["high-watermark"] = ext.high_watermark
        facts["low-watermark"] = ext.low_watermark
    for problem in ext.problems():
        warnings.append(f"{problem}: the image must not be used as a cache")
    return facts


async def _info_hook(img: Qcow2Image, info: dict[str, Any]) -> None:
    warnings: list[str] = []
    facts = await cache_facts(img, warnings)
    if facts is not None:
        info["cache"] = facts
    if warnings:
        info.setdefault("warnings", []).extend(warnings)


async def _check_hook(img: Qcow2Image, res: CheckResult) -> None:
    """The cache extension's rules that a plain qcow2 check cannot know."""
    raw = img.header.find_extension(EXT_CACHE)
    if raw is None or img.header.backing_file is None:
        return
    from bootcache.qcow2 import cache_ext

    try:
        ext = cache_ext.CacheExtension.decode(raw.data, strict=False)
    except cache_ext.UnknownCacheVersion as e:
        res.note(f"Warning: {e}; checked as a plain qcow2 image")
        return
    except ImageFormatError as e:
        res.corruptions += 1
        res.note(f"ERROR {e}")
        return
    for problem in ext.problems():
        res.corruptions += 1
        res.note(f"ERROR {problem}")
    if ext.reserved_nonzero:
        res.note("Warning: cache extension: reserved bytes are not zero (ignored)")
    used = len(await img.allocated_clusters()) * img.cs
    if ext.used_bytes != used:
        res.note(f"Warning: cache extension: recorded used_bytes {ext.used_bytes} differs "
                 f"from the {used} bytes of data in the L2 tables (advisory only)")
    if ext.quota and used > ext.quota:
        res.note(f"Warning: cache extension: {used} bytes cached exceed the quota "
                 f"{ext.quota}")


INFO_HOOKS.append(_info_hook)
CHECK_HOOKS.append(_check_hook)


async def read_stats(path: str) -> dict[str, Any]:
    from bootcache.layers.cache import read_extension  # brings asyncio: not for info
    from bootcache.qcow2 import cache_ext

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
        import json  # this module is also loaded by info and check, which need no json

        click.echo(json.dumps(data, indent=4))
        return
    for key, value in data.items():
        click.echo(f"{key.replace('_', ' ')}: {value}")


COMMANDS = [cache]


def _add_publishing() -> None:
    # In their own module: publishing pulls in the S3 and compression code.
    from bootcache.cli.publish import publish, pull

    cache.add_command(publish)
    cache.add_command(pull)


_add_publishing()
