# SPDX-License-Identifier: LGPL-2.1-or-later
"""Who may manage VMs, decided by the container's real polkitd for a caller who is not root (bob),
through the socket-activated daemon with its socket opened to everyone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import poll
from tests.systemd.helpers import GUEST_DIR, Ctl, sh

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(shutil.which("pkcheck") is None and not Path("/usr/lib/polkit-1/polkitd").exists(),
                       reason="no polkitd in this tree"),
]

SOCKET = "/run/vmspawnd/io.vmspawnd.Manager"
REPO = Path(__file__).resolve().parents[2]
POLICY = Path("/usr/share/polkit-1/actions/io.vmspawnd.policy")
RULE = Path("/etc/polkit-1/rules.d/50-vmspawnd-test.rules")
DROP_IN = Path("/etc/systemd/system/vmspawnd.socket.d/open.conf")


@pytest.fixture
def open_socket(installed_units: Path) -> Iterator[Ctl]:
    """The policy installed, a user bob, and the daemon's socket open to all (0666)."""
    shutil.copy(REPO / "polkit" / "io.vmspawnd.policy", POLICY)
    if sh("id", "bob", check=False).returncode != 0:
        sh("useradd", "--no-create-home", "bob")
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text("[Socket]\nSocketMode=0666\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "vmspawnd.socket")
    try:
        yield Ctl(installed_units)
    finally:
        RULE.unlink(missing_ok=True)
        DROP_IN.unlink(missing_ok=True)
        sh("systemctl", "unmask", "--runtime", "polkit.service", check=False)


def as_bob(method: str, parameters: str) -> tuple[int, str]:
    p = sh("setpriv", "--reuid=bob", "--regid=bob", "--init-groups", "varlinkctl", "call", SOCKET,
           f"io.vmspawnd.Manager.{method}", parameters, check=False)
    return p.returncode, p.stdout if p.returncode == 0 else p.stderr + p.stdout  # an error's parameters: stdout


def test_polkit_decides_what_a_caller_who_is_not_root_may_do(open_socket: Ctl) -> None:
    ctl = open_socket
    ctl("create", "pk", f"--linux={GUEST_DIR / 'vmlinuz'}")
    rc, out = as_bob("Describe", '{"name": "pk"}')
    assert rc == 0 and json.loads(out)["machine"]["owner"] == 0, out  # anyone may look
    rc, out = as_bob("Remove", '{"name": "pk"}')
    assert rc != 0 and "PermissionDenied" in out and "io.vmspawnd.manage" in out, out  # polkit said no
    assert ctl.status("pk")["state"] == "stopped"

    RULE.write_text('polkit.addRule(function(action, subject) {\n'
                    '  if (action.id == "io.vmspawnd.manage" && subject.user == "bob") return polkit.Result.YES;\n'
                    '});\n')
    sh("systemctl", "restart", "polkit.service")  # rules are read at start (and watched)
    poll(lambda: as_bob("Remove", '{"name": "pk"}'), lambda r: r[0] == 0, 30)  # granted by the rule
    assert "pk" not in ctl("list", "--no-legend").stdout

    sh("systemctl", "mask", "--runtime", "polkit.service")
    sh("systemctl", "stop", "polkit.service")
    rc, out = as_bob("Create", '{"name": "pk2", "config": {"linux": "/var/cache/vmspawnd-test-guest/vmlinuz"}}')
    assert rc != 0 and "PermissionDenied" in out, out  # no polkit: no, whatever the rules say
