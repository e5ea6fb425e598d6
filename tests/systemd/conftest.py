# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd tier: tests marked ``@pytest.mark.systemd`` need a real service manager.

They run inside the container that ``make test-systemd`` (``python -m tests.systemd.container
test``) boots. Anywhere else -- e.g. a plain ``pytest`` on a host whose PID 1 is not systemd --
they are skipped with the reason why.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import GUEST_DIR, NAME, Ctl, pids_of, sh, systemd_version, why_no_systemd
from vmspawnd.systemd.machined import MACHINED_VARLINK_SINCE
from vmspawnd.systemd.unitfile import render
from vmspawnd.testing.guest import GUEST_WORDS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = why_no_systemd()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("systemd") is not None:
            item.add_marker(skip)


@pytest.fixture
def machined() -> None:
    """systemd-machined running, with its varlink interface (the harness does not start it: VM tests
    leave that to the daemon)."""
    if systemd_version() < MACHINED_VARLINK_SINCE:
        pytest.skip(f"systemd {systemd_version()}'s machined has no varlink interface (new in "
                    f"{MACHINED_VARLINK_SINCE}); vmspawnd registers over D-Bus there (test_integration.py)")
    sh("systemctl", "start", "systemd-machined.service")


@pytest.fixture
def installed_units() -> Iterator[Path]:
    """The project's units installed into /etc/systemd/system with @BINDIR@ = this venv's bin dir.

    Yields the bin dir. Afterwards the units are stopped, removed and systemd reloaded (the
    container's root is a tmpfs overlay anyway, but the next test gets a clean manager).
    """
    repo = Path(__file__).resolve().parents[2]
    bindir = Path(sys.executable).parent  # the venv running the tests (not resolved: a venv symlink)
    unit_dir = Path("/etc/systemd/system")
    service = render((repo / "units/vmspawnd.service").read_text(), str(bindir), str(repo), systemd_version())
    (unit_dir / "vmspawnd.service").write_text(service)
    socket_unit = render((repo / "units/vmspawnd.socket").read_text(), str(bindir), str(repo), systemd_version())
    (unit_dir / "vmspawnd.socket").write_text(socket_unit)
    sh("systemctl", "daemon-reload")
    try:
        yield bindir
    finally:
        sh("systemctl", "stop", "vmspawnd.socket", "vmspawnd.service", check=False)
        sh("systemctl", "reset-failed", "vmspawnd.socket", "vmspawnd.service", check=False)
        for name in ("vmspawnd.service", "vmspawnd.socket"):
            (unit_dir / name).unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")


@pytest.fixture
def vm(installed_units: Path) -> Iterator[Ctl]:
    """A running, ready test VM created through the socket-activated daemon (hangs after READY=1)."""
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = Ctl(installed_units)
    ctl("create", NAME, f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}", "--ram=256M",
        "--console=read-only", "--firmware=bios", *GUEST_WORDS, "test.action=hang")
    ctl("start", NAME)
    try:
        ctl.wait(lambda s: s["ready"])
        yield ctl
    finally:
        ctl("stop", NAME, "--timeout=1", check=False)
        ctl("remove", NAME, check=False)
        for comm in ("qemu-system-x86", "swtpm"):  # helpers end a moment after their VM
            poll(lambda comm=comm: pids_of(comm), lambda pids: pids == [], 30)


