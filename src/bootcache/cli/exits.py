"""How a click command's outcome becomes the process's exit status.

Shared by ``bootcache`` and ``python -m bootcache.cli.serve``: click's own
errors print as click prints them, a BootcacheError prints as one line
``bootcache: ...`` (never a traceback), and both exit nonzero.
"""

from __future__ import annotations

import sys

import click

from bootcache.errors import BootcacheError


def run_command(command: click.Command) -> None:
    """Run ``command`` on sys.argv; exit with its status."""
    try:
        command.main(standalone_mode=False)
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
