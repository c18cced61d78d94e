"""The ``bootcache`` command: a qemu-img-like front end.

Each command group lives in its own module under ``bootcache.cli`` and is
registered here.
"""

from __future__ import annotations

import sys

import click

from bootcache.errors import BootcacheError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bootcache")
def cli() -> None:
    """Cache images for fast, many-VM boots from one remote base."""


def _register() -> None:
    # Imported here so that each module can import ``cli`` without a cycle.
    from bootcache.cli import bench, cache, images, vm

    for command in [*images.COMMANDS, *cache.COMMANDS, *bench.COMMANDS, *vm.COMMANDS]:
        cli.add_command(command)
    from bootcache.cli.serve import serve
    cli.add_command(serve)
    from bootcache.cli.ctl import ctl
    cli.add_command(ctl)


def main() -> None:
    _register()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except BootcacheError as e:
        click.echo(f"bootcache: {e}", err=True)
        sys.exit(1)
