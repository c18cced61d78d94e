"""The commands that do not serve must not import what only serving, remote
bases or benchmarks need: that import time is most of a command's start-up.

Structural checks, not timings (bench/cli_startup.py measures those).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bootcache.cli.main import COMMANDS, cli

HEAVY = ["aiohttp", "aiobotocore", "botocore", "matplotlib", "uvloop", "zstandard",
         "bootcache.nbd.server", "bootcache.storm.bench", "bootcache.sources.http",
         "bootcache.sources.s3"]

# Runs one command in a fresh interpreter, in-process, then lists which of
# HEAVY it left in sys.modules.
PROBE = """
import json, sys
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["bootcache", *args]
from bootcache.cli.main import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps([m for m in heavy if m in sys.modules]))
"""


def loaded_after(*args: str, cwd: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
                         cwd=cwd, check=True, capture_output=True, text=True).stdout
    loaded: list[str] = json.loads(out.splitlines()[-1])
    return loaded


@pytest.fixture
def image(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "bootcache", "create", "-q", "x.qcow2", "64M"],
                   cwd=tmp_path, check=True)
    return tmp_path / "x.qcow2"


@pytest.mark.parametrize("args", [
    ["--help"],
    ["info", "x.qcow2"],
    ["info", "--output", "json", "x.qcow2"],
    ["check", "x.qcow2"],
    ["create", "-q", "new.qcow2", "1G"],
    ["create", "-q", "--cache-quota", "10M", "-b", "x.qcow2", "-F", "qcow2", "c.qcow2"],
])
def test_commands_do_not_import_heavy_modules(image: Path, args: list[str]) -> None:
    assert loaded_after(*args, cwd=image.parent) == []


def test_info_still_reports_cache_facts(image: Path) -> None:
    # The cache facts come from bootcache.cli.cache, which `info` itself no
    # longer imports through the command table.
    subprocess.run([sys.executable, "-m", "bootcache", "create", "-q", "--cache-quota", "10M",
                    "-b", "x.qcow2", "-F", "qcow2", "c.qcow2"], cwd=image.parent, check=True)
    out = subprocess.run([sys.executable, "-m", "bootcache", "info", "--output", "json",
                          "c.qcow2"], cwd=image.parent, check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out)["cache"]["quota"] == 10 << 20


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_listed_help_is_the_commands_own(name: str) -> None:
    # --help lists the commands from COMMANDS without importing them: the
    # text kept there must be what the command itself says.
    group = cli
    assert isinstance(group, click.Group)
    with click.Context(group) as ctx:
        cmd = group.get_command(ctx, name)
    assert cmd is not None and cmd.name == name
    assert cmd.get_short_help_str(limit=1000) == COMMANDS[name][1]
