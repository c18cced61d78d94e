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

import cache.conftest
from bootcache.cli.main import COMMANDS, cli
from daemon.conftest import Daemon

# Never for a command that neither serves nor reaches a remote base.
HEAVY = ["aiohttp", "aiobotocore", "botocore", "pycurl", "matplotlib", "uvloop", "zstandard",
         "prometheus_client", "qemu.qmp", "bootcache.nbd.server", "bootcache.daemon.service",
         "bootcache.storm.bench", "bootcache.sources.http", "bootcache.sources.s3",
         "bootcache.layers.cache"]
# Not for these either: each was about a third of a command's start-up.
# asyncio: reading or creating a local image runs without an event loop;
# importlib.metadata: --version; http.client (and ssl): the control client.
SLOW_STDLIB = ["asyncio", "importlib.metadata", "http.client", "ssl"]

sockdir = cache.conftest.sockdir

# Runs one command in a fresh interpreter, in-process, then lists which of
# the modules asked about it left in sys.modules.
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


def loaded_after(*args: str, cwd: Path, modules: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(modules)],
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
    ["--version"],
    ["info", "x.qcow2"],
    ["info", "--output", "json", "--backing-chain", "x.qcow2"],
    ["check", "x.qcow2"],
    ["check", "--output", "json", "x.qcow2"],
    ["create", "-q", "new.qcow2", "1G"],
    ["create", "-q", "-f", "raw", "new.raw", "1G"],
    # The size comes from the backing file: opened, without an event loop.
    ["create", "-q", "--cache-quota", "10M", "-b", "x.qcow2", "-F", "qcow2", "c.qcow2"],
])
def test_local_commands_import_no_heavy_module(image: Path, args: list[str]) -> None:
    assert loaded_after(*args, cwd=image.parent, modules=HEAVY + SLOW_STDLIB) == []


def test_cache_image_commands_import_no_heavy_module(image: Path) -> None:
    # A cache image: info and check add the cache extension's facts and rules
    # (bootcache.cli.cache) without opening it as a cache.
    subprocess.run([sys.executable, "-m", "bootcache", "create", "-q", "--cache-quota", "10M",
                    "-b", "x.qcow2", "-F", "qcow2", "c.qcow2"], cwd=image.parent, check=True)
    for args in (["info", "c.qcow2"], ["check", "c.qcow2"]):
        assert loaded_after(*args, cwd=image.parent, modules=HEAVY + SLOW_STDLIB) == [], args


def test_ctl_list_imports_no_heavy_module(image: Path, sockdir: str) -> None:
    daemon = Daemon(image.parent, sockdir, "--read-only", str(image)).start()
    try:
        loaded = loaded_after("ctl", "--control", daemon.control, "list", cwd=image.parent,
                              modules=HEAVY + SLOW_STDLIB)
    finally:
        daemon.stop()
    assert loaded == []


def test_the_probe_sees_what_serving_imports(image: Path) -> None:
    # The probe above must be able to fail: `serve --help` loads the daemon.
    loaded = loaded_after("serve", "--help", cwd=image.parent, modules=HEAVY + SLOW_STDLIB)
    assert "asyncio" in loaded


def test_version_is_the_installed_distributions() -> None:
    # --version prints bootcache.__version__, which pyproject.toml reads; the
    # installed metadata must agree (a stale install would not).
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "bootcache", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.split()[-1] == version("bootcache")


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
