# SPDX-License-Identifier: LGPL-2.1-or-later
"""``make install`` / ``make uninstall`` into a DESTDIR: a self-contained copy, commands in bin/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from vmspawnd.auth import MANAGE_ALL, PRIVILEGED

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
        script = lib / "bin" / command  # starts where it lands too, not in the staging tree
        assert script.read_text().startswith("#!/usr/local/lib/vmspawnd/bin/python"), script.read_text()[:200]
        p = subprocess.run([str(lib / "bin/python"), str(script), "--help"], capture_output=True, text=True,
                           timeout=60)
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
    socket_unit = (dest / "etc/systemd/system/vmspawnd.socket").read_text()
    assert "Documentation=file:/usr/local/share/doc/vmspawnd/README.md" in socket_unit  # where make put it
    policy = (dest / "usr/share/polkit-1/actions/io.vmspawnd.policy").read_text()  # where polkit reads it
    actions = {a.get("id") for a in ElementTree.fromstring(policy).iter("action")}
    assert actions == {MANAGE_ALL, PRIVILEGED}  # what the daemon asks polkit for, and nothing else
    for page in ("man1/vmspawn.1", "man1/vmspawnctl.1", "man8/vmspawnd.8"):  # made from the parsers
        assert (dest / "usr/local/share/man" / page).read_text().startswith(".TH ")
    make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local")
    left = [p for p in dest.rglob("*") if not p.is_dir()]
    assert left == [], left


def test_the_wheel_carries_units_interface_docs_and_license(tmp_path):
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                        str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (wheel,) = wheels.glob("vmspawnd-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    p = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    share = venv / "share"
    for path in ("vmspawnd/units/vmspawnd.service", "vmspawnd/units/vmspawnd.socket",
                 "varlink/io.vmspawnd.Manager.varlink", "doc/vmspawnd/README.md", "doc/vmspawnd/LICENSE"):
        assert (share / path).is_file(), path
    unit = subprocess.run([str(venv / "bin/vmspawnd"), "--print-unit=service"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={venv}/bin/vmspawnd\n" in unit.stdout
    assert "@BINDIR@" not in unit.stdout and "@DOCDIR@" not in unit.stdout  # every placeholder filled
    licenses = list((venv / "lib").glob("python3*/site-packages/vmspawnd-*.dist-info/licenses/LICENSE"))
    assert licenses and "LESSER GENERAL PUBLIC LICENSE" in licenses[0].read_text()


def test_make_keeps_the_venv_unless_it_was_made_with_another_python(tmp_path):
    """The venv rule (Makefile: ``$(VENV)/pyvenv.cfg``) on a copy of the Makefile: a venv of the wanted
    interpreter is kept as it is; one whose interpreter is not the wanted one (an upgraded or removed
    Python) is made again with the wanted one; a ``PYTHON=`` that cannot run keeps it and says so.
    (``MAKE=true``: the Debian packages' step it runs first is not what is tested here.)"""
    (tmp_path / "Makefile").write_bytes((REPO / "Makefile").read_bytes())
    python = os.path.realpath("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)

    def venv_rule(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "--no-print-directory", "-C", str(tmp_path), "MAKE=true", *args,
                               ".venv/pyvenv.cfg"], capture_output=True, text=True, timeout=300)

    made = venv_rule(f"PYTHON={python}")
    assert made.returncode == 0, made.stderr
    config = tmp_path / ".venv" / "pyvenv.cfg"
    assert f"executable = {python}\n" in config.read_text()
    mark = tmp_path / ".venv" / "mark"  # (what someone installed into it)
    mark.touch()

    kept = venv_rule(f"PYTHON={python}")
    assert kept.returncode == 0 and "made again" not in kept.stdout, kept.stdout + kept.stderr
    assert mark.exists()

    broken = venv_rule(f"PYTHON={tmp_path / 'no-such-python'}")
    assert broken.returncode != 0 and ".venv kept" in broken.stderr, broken.stderr
    assert mark.exists()

    config.write_text(config.read_text().replace(f"executable = {python}", "executable = /usr/bin/python3.9"))
    again = venv_rule(f"PYTHON={python}")
    assert again.returncode == 0, again.stderr
    assert f".venv was made with /usr/bin/python3.9: made again with {python}" in again.stdout, again.stdout
    assert f"executable = {python}\n" in config.read_text() and not mark.exists()
