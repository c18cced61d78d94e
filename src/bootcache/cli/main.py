"""The ``bootcache`` command: a qemu-img-like front end.

Each command group lives in its own module under ``bootcache.cli``; it is
named in ``COMMANDS`` below and imported only when it is run.
"""

from __future__ import annotations

import gc

import click

from bootcache import __version__
from bootcache.cli.exits import run_command
from bootcache.cli.lazy import LazyGroup

#: name -> (where the command is, its short help for ``bootcache --help``);
#: tests/test_cli_startup.py checks that the help matches the command's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("bootcache.cli.bench:bench", "Benchmarks."),
    "cache": ("bootcache.cli.cache:cache", "Inspect cache images."),
    "check": ("bootcache.cli.images:check",
              "Check an image; exit 0 clean, 1 not checkable, 2 corrupt, 3 leaks only."),
    "ctl": ("bootcache.cli.ctl:ctl", "Add, remove and inspect the exports of a running daemon."),
    "create": ("bootcache.cli.images:create",
               "Create an image (sizes take K, M, G, T suffixes)."),
    "info": ("bootcache.cli.images:info", "Show facts about an image."),
    "map": ("bootcache.cli.images:map_cmd",
            "Show where the data of each range of an image comes from."),
    "resize": ("bootcache.cli.images:resize", "Grow a qcow2 image to SIZE (or by +SIZE)."),
    "serve": ("bootcache.cli.serve:serve",
              "Serve IMAGEs (and the catalog of --config) over NBD until SIGTERM."),
    "trace": ("bootcache.cli.bench:trace", "Record and replay boot traces."),
    "vm": ("bootcache.cli.vm:vm",
           "Hot-plug disks backed by a cache export into running VMs (QMP)."),
}


@click.group(cls=LazyGroup, lazy_subcommands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
# The version is the package's own (pyproject.toml reads it from there):
# asking the installed metadata for it imports importlib.metadata, which
# took longer than the rest of ``--version``.
@click.version_option(__version__, prog_name="bootcache")
def cli() -> None:
    """Cache images for fast, many-VM boots from one remote base."""


def main() -> None:
    try:
        run_command(cli)
    finally:
        # At exit the interpreter collects cyclic garbage over every object
        # the imports made (click, the engine): frozen, they are not scanned.
        # That is about a tenth of a short command's time, and nothing but
        # the exit runs after this.
        gc.freeze()

