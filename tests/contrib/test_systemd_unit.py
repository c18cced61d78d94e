"""contrib/systemd/bootcache.service: systemd itself parses it, and it keeps
the settings the daemon relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "bootcache.service"


def _service_section() -> dict[str, list[str]]:
    # systemd allows repeated keys; collect every value.
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_analyze_verify() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # verify reports unknown keys, bad values and missing executables; it
    # prints them without failing on some versions, so both must be clean.
    res = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_daemon_contract() -> None:
    s = _service_section()
    assert s["Type"] == ["notify"]  # the daemon sends READY=1 (bootcache.daemon.notify)
    assert s["ExecStart"] == ["/usr/bin/env bootcache serve --config /etc/bootcache/node.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["RuntimeDirectory"] == ["bootcache"]  # /run/bootcache/bootcache.sock
    assert s["ProtectSystem"] == ["strict"]
    assert "/var/lib/bootcache" in s["ReadWritePaths"]
    assert int(s["LimitNOFILE"][0]) >= 4096


def test_parses_as_ini() -> None:
    # A cheap guard where systemd-analyze is missing: no stray lines.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
