"""``bootcache cache ...``: commands about cache images."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from bootcache.cli.images import CHECK_HOOKS, INFO_HOOKS, run
from bootcache.errors import BootcacheError, ImageFormatError
from bootcache.qcow2.format import AUTOCLEAR_CACHE, EXT_CACHE
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource

if TYPE_CHECKING:
    from bootcache.qcow2 import profile_ext
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
    from bootcache.qcow2 import profile_ext

    try:
        prof = profile_ext.read_profile(img.header)
    except ImageFormatError as e:
        warnings.append(f"{e}: the boot profile is ignored")
    else:
        if prof is not None:
            facts["profile"] = {"clusters": prof.clusters, "bytes": prof.bytes,
                                "ranges": len(prof.ranges), "complete": prof.complete,
                                "truncated": prof.truncated}
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
    from bootcache.qcow2 import profile_ext

    try:
        profile_ext.read_profile(img.header)
    except ImageFormatError as e:
        res.note(f"Warning: {e} (the boot profile is ignored)")
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


async def read_profile(path: str) -> profile_ext.Profile:
    """The boot profile a cache image holds (no lock: a daemon may hold it)."""
    from bootcache.layers.cache import read_extension
    from bootcache.qcow2 import profile_ext

    source = FileSource(path, lock=False)
    try:
        img = await Qcow2Image.open(source, name=path)
        if read_extension(img) is None:
            raise ImageFormatError(f"{path}: not a cache image")
        prof = profile_ext.read_profile(img.header)
        if prof is None:
            raise BootcacheError(f"{path}: no boot profile yet (a cache records one as it "
                                 "fetches from its base)")
        return prof
    finally:
        await source.close()


def _describe(prof: profile_ext.Profile) -> list[str]:
    state = "complete" if prof.complete else "still recording"
    if prof.truncated:
        state += ", truncated to fit the header cluster"
    out = [f"virtual size: {prof.virtual_size}",
           f"cluster size: {prof.cluster_size}",
           f"profile: {prof.clusters} clusters ({prof.bytes} bytes) in {len(prof.ranges)} "
           f"ranges, {state}"]
    for start, count in prof.ranges[:10]:
        out.append(f"  clusters {start} - {start + count - 1}")
    if len(prof.ranges) > 10:
        out.append(f"  ... {len(prof.ranges) - 10} more ranges")
    return out


@cache.command()
@click.option("-o", "output_file", metavar="FILE", help="Write the profile to FILE (JSON).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.argument("filename")
def profile(output_file: str | None, output: str, filename: str) -> None:
    """Show or export the boot profile of a cache image: the order in which
    it first fetched its clusters (bootcache create --cache-profile takes it)."""
    from bootcache.qcow2 import profile_ext

    prof = run(read_profile(filename))
    if output_file:
        tmp = output_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(profile_ext.dumps(prof))
        os.replace(tmp, output_file)
    if output == "json":
        click.echo(profile_ext.dumps(prof), nl=False)
    elif not output_file:
        click.echo("\n".join(_describe(prof)))


@cache.command()
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.argument("filename")
def warm(concurrency: int, quiet: bool, filename: str) -> None:
    """Fetch every cluster the cache's boot profile names and it does not
    hold (up to the quota), then exit. The cache must not be in use."""
    from bootcache.layers.cache import CacheLayer
    from bootcache.layers.chain import ChainPolicy, open_layer
    from bootcache.layers.prefetch import Prefetcher

    async def main() -> tuple[str, int, int]:
        layer = await open_layer(filename, policy=ChainPolicy.from_env())
        try:
            if not isinstance(layer, CacheLayer):
                raise ImageFormatError(f"{filename}: not a cache image")
            if layer.profile is None or not layer.profile.ranges:
                raise BootcacheError(f"{filename}: the cache has no boot profile to warm from "
                                     "(bootcache create --cache-profile gives it one)")
            pre = Prefetcher(layer, concurrency=concurrency, quiet=0)
            planned = pre.planned_bytes()
            bar = _progress_bar(planned, quiet)
            pre.progress = bar.update
            try:
                res = await pre.run()
            finally:
                bar.close()
            if res.outcome == "failed":
                raise BootcacheError(f"{filename}: warming failed; see the warning above")
            return res.outcome, res.fetched_bytes, planned
        finally:
            await layer.close()

    outcome, fetched, planned = run(main())
    note = " (the cache is full: its quota is reached)" if outcome == "quota" else ""
    click.echo(f"{filename}: fetched {fetched} of {planned} bytes the profile names and the "
               f"cache did not hold{note}", err=True)


def _progress_bar(total: int, quiet: bool) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="warming",
                disable=quiet or None, leave=False)


COMMANDS = [cache]


def _add_publishing() -> None:
    # In their own module: publishing pulls in the S3 and compression code.
    from bootcache.cli.publish import publish, pull

    cache.add_command(publish)
    cache.add_command(pull)


_add_publishing()
