"""Image commands with qemu-img's habits: create, info, check, map."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bootcache.block.sync import run_without_loop
from bootcache.errors import BootcacheError, ImageFormatError
from bootcache.qcow2 import format as fmt

if TYPE_CHECKING:
    # Imported by the commands that use them: each command loads only its own
    # (``create`` opens no image unless it sizes a backing file).
    from bootcache.qcow2.check import CheckResult
    from bootcache.qcow2.create import CreateOptions
    from bootcache.qcow2.image import Qcow2Image

T = TypeVar("T")
_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
             "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str) -> int:
    """Sizes as qemu-img takes them: bytes, or K/M/G/T/P/E (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)\s*", text)
    if not m:
        raise click.BadParameter(f"invalid size {text!r} (use e.g. 512, 64K, 10G)")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if value != int(value):
        raise click.BadParameter(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_options(text: str | None) -> dict[str, str]:
    """``-o key=value,key=value`` into a dict (``,,`` is a literal comma)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in re.split(r"(?<!,),(?!,)", text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"option {item!r} needs a value (key=value)")
        out[key.strip()] = value.replace(",,", ",")
    return out


def _bool_opt(key: str, value: str) -> bool:
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise click.BadParameter(f"{key} must be on or off, not {value!r}")


def run(coro: Awaitable[T]) -> T:
    """Run ``coro`` in an event loop (remote sources, flushes, caches need one)."""
    import asyncio

    async def wrapper() -> T:
        return await coro
    return asyncio.run(wrapper())


def run_local(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``, which only reads local images, without an event loop:
    asyncio's import is about a third of such a command's start-up."""
    return run_without_loop(coro)


def _emit_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(obj, indent=4))


# -- create -------------------------------------------------------------------

# With the cache options (qcow2.cache_options.CACHE_KEYS): imported by create only.
QCOW2_CREATE_KEYS = {"cluster_size", "compat", "lazy_refcounts", "refcount_bits",
                     "compression_type", "backing_file", "backing_fmt", "extended_l2", "size"}


def create_options(opts: dict[str, str]) -> CreateOptions:
    from bootcache.qcow2.cache_options import CACHE_KEYS, cache_extension_from_options
    from bootcache.qcow2.create import CreateOptions

    unknown = set(opts) - QCOW2_CREATE_KEYS - CACHE_KEYS
    if unknown:
        raise click.BadParameter(f"unknown -o option(s): {', '.join(sorted(unknown))}")
    co = CreateOptions()
    if "cluster_size" in opts:
        co.cluster_size = parse_size(opts["cluster_size"])
    if "compat" in opts:
        co.compat = {"v2": "0.10", "v3": "1.1"}.get(opts["compat"], opts["compat"])
    if "lazy_refcounts" in opts:
        co.lazy_refcounts = _bool_opt("lazy_refcounts", opts["lazy_refcounts"])
    if "extended_l2" in opts:
        co.extended_l2 = _bool_opt("extended_l2", opts["extended_l2"])
    if "refcount_bits" in opts:
        co.refcount_bits = int(opts["refcount_bits"])
    if "compression_type" in opts:
        co.compression_type = opts["compression_type"]
    co.backing_file = opts.get("backing_file")
    co.backing_fmt = opts.get("backing_fmt")
    cache = cache_extension_from_options(opts, parse_size)
    if cache is not None:
        co.extensions = ((fmt.EXT_CACHE, cache.encode()),)
        co.autoclear = fmt.AUTOCLEAR_CACHE
    return co


async def _backing_size(image: str, backing: str, backing_fmt: str | None) -> int:
    from bootcache.layers.chain import ChainPolicy, is_uri, open_layer

    path = backing
    if not is_uri(backing) and not os.path.isabs(backing):
        path = os.path.join(os.path.dirname(image), backing)
    layer = await open_layer(path, fmt=backing_fmt, policy=ChainPolicy(trusted=True),
                             follow_backing=False)
    try:
        return layer.size
    finally:
        await layer.close()


@click.command()
@click.option("-f", "image_fmt", default="qcow2", type=click.Choice(["qcow2", "raw"]),
              help="Image format.")
@click.option("-b", "backing", help="Backing file (path or URI).")
@click.option("-F", "backing_fmt", help="Backing file format.")
@click.option("-o", "options", help="Format options key=value,...")
@click.option("-u", "unsafe", is_flag=True, help="Do not open the backing file.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("--cache-quota", help="Make a cache image with this quota (e.g. 100M).")
@click.option("--cache-policy", type=click.Choice(["stop", "lru"]),
              help="What a full cache does: stop caching (default) or evict LRU clusters.")
@click.option("--cache-on-stale", type=click.Choice(["reset", "refuse"]),
              help="When the base changed: drop the cache (default) or refuse to serve.")
@click.option("--cache-profile", metavar="FILE",
              help="Start the cache with this boot profile (a profile file or a boot trace).")
@click.argument("filename")
@click.argument("size", required=False)
def create(image_fmt: str, backing: str | None, backing_fmt: str | None, options: str | None,
           unsafe: bool, quiet: bool, cache_quota: str | None, cache_policy: str | None,
           cache_on_stale: str | None, cache_profile: str | None, filename: str,
           size: str | None) -> None:
    """Create an image (sizes take K, M, G, T suffixes).

    A cache image is created with -o cache_img_quota=BYTES or --cache-quota.
    """
    from bootcache.qcow2.cache_options import CACHE_KEYS
    from bootcache.qcow2.create import create_qcow2, create_raw

    opts = parse_options(options)
    for key, value in (("cache_img_quota", cache_quota), ("cache_policy", cache_policy),
                       ("cache_on_stale", cache_on_stale)):
        if value is not None:
            opts[key] = value
    if any(k in opts for k in CACHE_KEYS) and "cache_img_quota" not in opts:
        raise click.UsageError("cache options need a quota (--cache-quota or cache_img_quota)")
    if cache_profile and "cache_img_quota" not in opts:
        raise click.UsageError("--cache-profile is for cache images: give --cache-quota too")
    if "size" in opts and size is None:
        size = opts.pop("size")
    opts.pop("size", None)
    co = create_options(opts)
    co.backing_file = backing or co.backing_file
    co.backing_fmt = backing_fmt or co.backing_fmt
    if image_fmt == "raw":
        if co.backing_file:
            raise click.UsageError("raw images cannot have a backing file")
        if size is None:
            raise click.UsageError("raw images need a size")
        create_raw(filename, parse_size(size))
        nbytes = parse_size(size)
    else:
        if size is not None:
            nbytes = parse_size(size)
        elif co.backing_file and not unsafe:
            from bootcache.layers.chain import is_uri

            sizing = _backing_size(filename, co.backing_file, co.backing_fmt)
            # A local backing file is read without an event loop; a remote one needs it.
            nbytes = run(sizing) if is_uri(co.backing_file) else run_local(sizing)
        else:
            raise click.UsageError("a size is needed (or a backing file to take it from)")
        if co.extensions and not co.backing_file:
            raise click.UsageError("a cache image needs a base: give -b BACKING")
        if cache_profile:
            _add_profile(co, cache_profile, nbytes, quiet)
        create_qcow2(filename, nbytes, co)
    if not quiet:
        extra = f" backing_file={co.backing_file}" if co.backing_file else ""
        extra += f" backing_fmt={co.backing_fmt}" if co.backing_fmt else ""
        click.echo(f"Formatting '{filename}', fmt={image_fmt} size={nbytes}{extra}")


def _add_profile(co: CreateOptions, path: str, size: int, quiet: bool) -> None:
    """Put a boot profile into the new cache image's header (checked against
    the image first: a bad profile is refused before anything is written)."""
    from bootcache.qcow2 import cache_ext, profile_ext
    from bootcache.qcow2.create import build_header
    from bootcache.storm.trace import load_profile

    try:
        prof = load_profile(path, size, co.cluster_size)
    except BootcacheError as e:
        raise click.BadParameter(str(e), param_hint="--cache-profile") from e
    quota = next(cache_ext.CacheExtension.decode(data).quota
                 for kind, data in co.extensions if kind == fmt.EXT_CACHE)
    named = prof.clusters
    prof = prof.limited(quota // co.cluster_size)
    prof.flags |= profile_ext.FLAG_COMPLETE  # given, not recorded: the cache keeps it as is
    header, _, _ = build_header(size, co)
    room = profile_ext.room_for_profile(header)
    if room < profile_ext.FIXED_SIZE:
        raise click.BadParameter(
            f"{path}: the header cluster of a {co.cluster_size}-byte-cluster image has no "
            "room for a profile; use clusters of 8 KiB or more", param_hint="--cache-profile")
    data = prof.encode(room)
    co.extensions = (*co.extensions, (profile_ext.EXT_PROFILE, data))
    if not quiet and prof.clusters < named:
        why = "the header cluster holds no more" if prof.truncated else "its quota"
        click.echo(f"warning: the profile names {named} clusters; the cache keeps the first "
                   f"{prof.clusters} ({why})", err=True)


# -- info ---------------------------------------------------------------------

async def image_info(path: str, *, force_share: bool = False) -> dict[str, Any]:
    """The facts ``qemu-img info --output json`` reports, under its names."""
    from bootcache.layers.chain import is_uri, probe_format
    from bootcache.qcow2.image import Qcow2Image
    from bootcache.sources.file import FileSource

    source = FileSource(path, lock=not force_share)
    try:
        info: dict[str, Any] = {"filename": path,
                                "actual-size": os.stat(path).st_blocks * 512}
        if await probe_format(source) == "raw":
            info.update({"format": "raw", "virtual-size": await source.size()})
            return info
        img = await Qcow2Image.open(source, writable=False, name=path)
        h = img.header
        info.update({"format": "qcow2", "virtual-size": img.size, "cluster-size": h.cluster_size,
                     "dirty-flag": bool(h.incompatible_features & fmt.INCOMPAT_DIRTY)})
        data: dict[str, Any] = {"compat": "1.1" if h.version == 3 else "0.10",
                                "compression-type": fmt.COMPRESSION_NAMES[h.compression_type],
                                "refcount-bits": h.refcount_bits}
        if h.version == 3:
            data.update({
                "lazy-refcounts": bool(h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
                "corrupt": bool(h.incompatible_features & fmt.INCOMPAT_CORRUPT),
                "extended-l2": h.extended_l2})
        info["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            full = h.backing_file
            if not is_uri(full) and not os.path.isabs(full):
                full = os.path.join(os.path.dirname(os.path.abspath(path)), full)
            info["full-backing-filename"] = full
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        for module in INFO_HOOK_MODULES:
            importlib.import_module(module)  # registers its hook, once
        for hook in INFO_HOOKS:
            await hook(img, info)
        return info
    finally:
        await source.close()


#: Extra facts other modules add to ``info`` (the cache extension does).
INFO_HOOKS: list[Callable[[Qcow2Image, dict[str, Any]], Awaitable[None]]] = []
#: Extra rules other modules check (the cache extension's), after the qcow2 check.
CHECK_HOOKS: list[Callable[[Qcow2Image, CheckResult], Awaitable[None]]] = []
#: The modules that append to INFO_HOOKS and CHECK_HOOKS: the CLI imports a
#: command's module only when it runs, so ``info`` and ``check`` import these.
INFO_HOOK_MODULES = ("bootcache.cli.cache",)


def _human_size(n: int) -> str:
    for unit, div in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                      ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.3g} {unit}"
    return f"{n} B"


def _print_info(info: dict[str, Any]) -> None:
    click.echo(f"image: {info['filename']}")
    click.echo(f"file format: {info['format']}")
    vs = info["virtual-size"]
    click.echo(f"virtual size: {_human_size(vs)} ({vs} bytes)")
    click.echo(f"disk size: {_human_size(info['actual-size'])}")
    if "cluster-size" in info:
        click.echo(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        click.echo(f"backing file: {info['backing-filename']}")
        if "backing-filename-format" in info:
            click.echo(f"backing file format: {info['backing-filename-format']}")
    data = info.get("format-specific", {}).get("data")
    if data:
        click.echo("Format specific information:")
        for k, v in data.items():
            if isinstance(v, bool):
                v = str(v).lower()
            click.echo(f"    {k.replace('-', ' ')}: {v}")
    if "cache" in info:
        click.echo("Cache image:")
        for k, v in info["cache"].items():
            click.echo(f"    {k.replace('-', ' ')}: {v}")
    for warning in info.get("warnings", ()):
        click.echo(f"warning: {warning}", err=True)


@click.command()
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.option("--backing-chain", is_flag=True, help="Show every image of the chain.")
@click.option("-U", "--force-share", is_flag=True, help="Open without taking locks.")
@click.option("-f", "image_fmt", help="Format (probed if omitted).")
@click.argument("filename")
def info(output: str, backing_chain: bool, force_share: bool, image_fmt: str | None,
         filename: str) -> None:
    """Show facts about an image."""
    from bootcache.layers.chain import is_uri

    infos = [run_local(image_info(filename, force_share=force_share))]
    while backing_chain and "full-backing-filename" in infos[-1]:
        nxt = infos[-1]["full-backing-filename"]
        if is_uri(nxt) or len(infos) > 16:
            break
        infos.append(run_local(image_info(nxt, force_share=force_share)))
    if output == "json":
        _emit_json(infos if backing_chain else infos[0])
        return
    for i, one in enumerate(infos):
        if i:
            click.echo("")
        _print_info(one)


# -- check ----------------------------------------------------------------------

async def run_check(path: str, repair: str | None) -> CheckResult:
    from bootcache.layers.chain import probe_format
    from bootcache.qcow2.check import CheckResult, check_image
    from bootcache.qcow2.image import Qcow2Image
    from bootcache.sources.file import FileSource

    try:
        source = FileSource(path, writable=repair is not None)
    except BootcacheError as e:
        return CheckResult(filename=path, check_errors=1, messages=[str(e)])
    try:
        if await probe_format(source) != "qcow2":
            raise ImageFormatError(f"{path}: only qcow2 images can be checked")
        img = await Qcow2Image.open(source, writable=False, name=path)
        if repair is not None:
            img.writable = True
        res = await check_image(img, repair=repair)
        for module in INFO_HOOK_MODULES:
            importlib.import_module(module)
        for hook in CHECK_HOOKS:
            await hook(img, res)
        return res
    except BootcacheError as e:
        return CheckResult(filename=path, check_errors=1, messages=[str(e)])
    finally:
        await source.close()


@click.command()
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]), help="Repair.")
@click.option("-q", "quiet", is_flag=True)
@click.argument("filename")
def check(output: str, repair: str | None, quiet: bool, filename: str) -> None:
    """Check an image; exit 0 clean, 1 not checkable, 2 corrupt, 3 leaks only."""
    # A repair writes and flushes (fdatasync in a thread): that needs the loop.
    res = run(run_check(filename, repair)) if repair else run_local(run_check(filename, None))
    if output == "json":
        _emit_json(res.to_json())
    elif not quiet:
        for msg in res.messages:
            click.echo(msg, err=msg.startswith("ERROR") or bool(res.check_errors))
        if res.check_errors:
            click.echo(f"Could not check {filename}", err=True)
        else:
            if res.leaks_fixed or res.corruptions_fixed:
                click.echo(f"The following inconsistencies were found and repaired:\n\n"
                           f"    {res.leaks_fixed} leaked clusters\n"
                           f"    {res.corruptions_fixed} corruptions\n")
            if res.corruptions:
                click.echo(f"\n{res.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may "
                           "corrupt it.")
            if res.leaks:
                click.echo(f"\n{res.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.")
            if not res.corruptions and not res.leaks:
                click.echo("No errors were found on the image.")
            tc = max(res.total_clusters, 1)
            click.echo(f"{res.allocated_clusters}/{res.total_clusters} = "
                       f"{100 * res.allocated_clusters / tc:.2f}% allocated, "
                       f"{100 * res.fragmented_clusters / max(res.allocated_clusters, 1):.2f}% "
                       f"fragmented, "
                       f"{100 * res.compressed_clusters / max(res.allocated_clusters, 1):.2f}% "
                       "compressed clusters")
            click.echo(f"Image end offset: {res.image_end_offset}")
    sys.exit(res.exit_code)


# -- map ------------------------------------------------------------------------

async def map_image(path: str) -> list[dict[str, Any]]:
    """Allocation of the whole chain, as ``qemu-img map --output json`` gives it."""
    from bootcache.layers.chain import ChainPolicy, open_layer

    layer = await open_layer(path, policy=ChainPolicy.from_env())
    out: list[dict[str, Any]] = []
    try:
        await _map_layer(layer, 0, layer.size, 0, out)
    finally:
        await layer.close()
    return out


async def _map_layer(layer: Any, start: int, length: int, depth: int,
                     out: list[dict[str, Any]]) -> None:
    from bootcache.qcow2.image import COMPRESSED, DATA, UNALLOC, ZERO, Qcow2Image

    if not isinstance(layer, Qcow2Image):
        end = min(start + length, layer.size)
        if start < end:
            _map_add(out, start, end - start, depth, True, False, True, start)
        if start + length > end:
            pos = max(start, end)
            _map_add(out, pos, start + length - pos, depth, False, True, False, None)
        return
    for kind, guest, n, host in await layer.map_range(start, length):
        if kind == DATA:
            _map_add(out, guest, n, depth, True, False, True, host)
        elif kind == COMPRESSED:
            _map_add(out, guest, n, depth, True, False, True, None)
        elif kind == ZERO:
            _map_add(out, guest, n, depth, True, True, False, host or None)
        elif kind == UNALLOC:
            below = layer.backing
            if below is None:
                _map_add(out, guest, n, depth, False, True, False, None)
            else:
                await _map_layer(below, guest, n, depth + 1, out)


def _map_add(out: list[dict[str, Any]], start: int, length: int, depth: int, present: bool,
             zero: bool, data: bool, offset: int | None) -> None:
    if out:
        p = out[-1]
        contiguous = (p["offset"] is None and offset is None) or (
            p["offset"] is not None and offset is not None
            and p["offset"] + p["length"] == offset)
        if p["start"] + p["length"] == start and p["depth"] == depth and \
                p["present"] == present and p["zero"] == zero and p["data"] == data and contiguous:
            p["length"] += length
            return
    out.append({"start": start, "length": length, "depth": depth, "present": present,
                "zero": zero, "data": data, "offset": offset})


@click.command(name="map")
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@click.argument("filename")
def map_cmd(output: str, filename: str) -> None:
    """Show where the data of each range of an image comes from."""
    entries = run(map_image(filename))
    if output == "json":
        import json

        lines = []
        for e in entries:
            e = {k: v for k, v in e.items() if not (k == "offset" and v is None)}
            lines.append(json.dumps(e).replace("{", "{ ", 1))
        click.echo("[" + ",\n".join(lines) + "]")
        return
    click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if e["data"] and e["offset"] is not None:
            click.echo(f"{e['start']:<#16x}{e['length']:<#16x}{e['offset']:<#16x}"
                       f"depth {e['depth']}")


COMMANDS = [create, info, check, map_cmd]


# -- resize ---------------------------------------------------------------------

async def grow_image(path: str, size_arg: str) -> int:
    from bootcache.layers.chain import ChainPolicy, open_layer
    from bootcache.qcow2.image import Qcow2Image

    layer = await open_layer(path, writable=True, policy=ChainPolicy(trusted=True),
                             follow_backing=False)
    try:
        if not isinstance(layer, Qcow2Image):
            raise ImageFormatError(f"{path}: only qcow2 images can be resized")
        new = layer.size + parse_size(size_arg[1:]) if size_arg.startswith("+") \
            else parse_size(size_arg)
        await layer.grow(new)
        return new
    finally:
        await layer.close()


@click.command()
@click.argument("filename")
@click.argument("size")
def resize(filename: str, size: str) -> None:
    """Grow a qcow2 image to SIZE (or by +SIZE)."""
    new = run(grow_image(filename, size))
    click.echo(f"Image resized to {new} bytes.")


COMMANDS.append(resize)
