# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd.service as `make install` writes it for the host's systemd (vmspawnd.systemd.unitfile).
The systemd tier runs each of these under the real systemd it is for (bookworm 252, trixie 257,
forky 262), with `systemd-analyze verify`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmspawnd.systemd.unitfile import render

TEMPLATE = (Path(__file__).resolve().parents[2] / "units" / "vmspawnd.service").read_text()


def settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_newest_systemd_gets_the_template_with_its_placeholders_filled():
    text = render(TEMPLATE, "/opt/bin", "/opt/doc", None)
    assert "ExecStart=/opt/bin/vmspawnd" in settings(text) and "Documentation=file:/opt/doc/README.md" in text
    assert "@BINDIR@" not in text and "@DOCDIR@" not in text
    assert render(TEMPLATE, "/opt/bin", "/opt/doc", 262) == text


@pytest.mark.parametrize(("version", "service_type", "reload", "preserve"), [
    (252, "Type=notify", True, False),  # Debian 12
    (253, "Type=notify-reload", False, False),
    (254, "Type=notify-reload", False, True),
])
def test_an_older_systemd_gets_a_unit_it_understands(version, service_type, reload, preserve):
    lines = settings(render(TEMPLATE, "/b", "/d", version))
    assert [line for line in lines if line.startswith("Type=")] == [service_type]
    assert ("ExecReload=/bin/kill -HUP $MAINPID" in lines) is reload  # (SIGHUP re-reads the definitions)
    assert ("FileDescriptorStorePreserve=yes" in lines) is preserve
    assert "FileDescriptorStoreMax=8192" in lines  # the store itself is old: kept across restarts there


def test_make_installs_command_writes_the_unit_for_the_version_it_is_told():
    p = subprocess.run([sys.executable, "-m", "vmspawnd.systemd.unitfile", "units/vmspawnd.service", "--bindir=/b",
                        "--docdir=/d", "--systemd-version=252"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], check=True)
    assert p.stdout == render(TEMPLATE, "/b", "/d", 252)
