"""``make install`` / ``make uninstall`` into a DESTDIR: a self-contained copy, commands in bin/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("vmspawn", "vmspawnctl", "vmspawnd")


def make(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True,
                       timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_install_twice_then_uninstall(tmp_path):
    dest = tmp_path / "root"
    for _ in range(2):  # the second run upgrades in place
        make("install", f"DESTDIR={dest}", "PREFIX=/usr/local")
    lib = dest / "usr/local/lib/vmspawnd"
    for command in COMMANDS:
        link = dest / "usr/local/bin" / command
        assert os.readlink(link) == f"/usr/local/lib/vmspawnd/bin/{command}"  # where it lands without DESTDIR
        p = subprocess.run([str(lib / "bin" / command), "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and command in p.stdout, p.stderr
    # not the checkout: a copy of the package of its own
    where = subprocess.run([str(lib / "bin/python"), "-c", "import vmspawnd; print(vmspawnd.__file__)"],
                           capture_output=True, text=True, cwd="/", timeout=60).stdout
    assert where.startswith(str(lib)), where
    unit = (dest / "etc/systemd/system/vmspawnd.service").read_text()
    assert "ExecStart=/usr/local/bin/vmspawnd\n" in unit
    assert "Documentation=file:/usr/local/share/doc/vmspawnd/README.md" in unit
    assert (dest / "usr/local/share/doc/vmspawnd/README.md").is_file()
    assert (dest / "usr/local/share/varlink/io.vmspawnd.Manager.varlink").is_file()
    assert (dest / "etc/systemd/system/vmspawnd.socket").is_file()
    make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local")
    left = [p for p in dest.rglob("*") if not p.is_dir()]
    assert left == [], left
