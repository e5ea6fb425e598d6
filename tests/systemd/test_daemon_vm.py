"""A VM through the socket-activated daemon under the real systemd 257 (one small TCG guest at a time).

The busybox test guest is built on the host (vmspawnd.testing.guest) and bound read-only into the
container by the harness ($VMSPAWND_TEST_GUEST_DIR); without it these tests are skipped.
"""

from __future__ import annotations

import json

import pytest

from tests.systemd.helpers import GUEST_DIR, NAME, TPM_UNIT, Ctl, alive, qemu_cgroup, sh, unit_properties

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(not (GUEST_DIR / "vmlinuz").is_file(),
                       reason="no test guest bound in ($VMSPAWND_TEST_GUEST_DIR; `make test-systemd` binds the "
                              "host's vmspawnd.testing.guest build)"),
]


def test_vm_under_the_activated_daemon_outlives_a_daemon_restart(vm: Ctl) -> None:
    st = vm.status()
    assert st["state"] == "running" and st["pid"] > 0
    pid, units = st["pid"], st["units"]
    # QEMU runs in a unit systemd knows (the daemon's service, or a scope of its own); swtpm as a
    # transient service of its own
    qemu_unit = qemu_cgroup(pid).rsplit("/", 1)[1]
    assert qemu_unit == "vmspawnd.service" or qemu_unit.endswith(".scope"), qemu_cgroup(pid)
    assert unit_properties(qemu_unit, "ActiveState")["ActiveState"] == "active"
    assert TPM_UNIT in units, units
    for unit in units:
        assert unit_properties(unit, "ActiveState")["ActiveState"] == "active", unit
    assert unit_properties("vmspawnd.service", "StatusText")["StatusText"] == "1 VM(s) running"

    sh("systemctl", "stop", "vmspawnd.service")
    assert alive(pid), "QEMU died with the daemon"
    st = vm.status()  # re-activates the daemon through the socket
    assert st["state"] == "running" and st["pid"] == pid, st
    journal = sh("journalctl", "--no-pager", "-o", "cat", "-u", "vmspawnd.service").stdout
    assert "re-adopted running VM" in journal, journal

    stopped = json.loads(vm("--json", "stop", NAME, "--timeout=1").stdout)
    assert stopped["state"] == "stopped"
    assert not alive(pid)
    for unit in units:
        assert unit_properties(unit, "ActiveState")["ActiveState"] in ("inactive", ""), unit


def test_vm_keeps_its_tpm_across_a_daemon_restart(vm: Ctl) -> None:
    assert TPM_UNIT in vm.status()["units"]
    sh("systemctl", "stop", "vmspawnd.service")
    assert unit_properties(TPM_UNIT, "ActiveState")["ActiveState"] == "active", f"{TPM_UNIT} stopped with the daemon"
    assert TPM_UNIT in vm.status()["units"]
