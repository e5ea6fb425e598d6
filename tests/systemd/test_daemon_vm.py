"""A VM through the socket-activated daemon under the real systemd 257 (one small TCG guest at a time).

The busybox test guest is built on the host (vmspawnd.testing.guest) and bound read-only into the
container by the harness ($VMSPAWND_TEST_GUEST_DIR); without it these tests are skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.systemd.helpers import (
    GUEST_DIR,
    NAME,
    TPM_UNIT,
    Ctl,
    alive,
    qemu_cgroup,
    sh,
    unit_properties,
    wait_inactive,
    wait_journal,
)

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
    wait_journal("re-adopted running VM", "-o", "cat", "-u", "vmspawnd.service")

    stopped = json.loads(vm("--json", "stop", NAME, "--timeout=1").stdout)
    assert stopped["state"] == "stopped"
    assert not alive(pid)
    for unit in units:
        wait_inactive(unit)


def test_vm_keeps_its_tpm_across_a_daemon_restart(vm: Ctl) -> None:
    assert TPM_UNIT in vm.status()["units"]
    sh("systemctl", "stop", "vmspawnd.service")
    assert unit_properties(TPM_UNIT, "ActiveState")["ActiveState"] == "active", f"{TPM_UNIT} stopped with the daemon"
    assert TPM_UNIT in vm.status()["units"]


def test_varlinkctl_speaks_to_the_daemon_and_logs_carry_the_machine_field(vm: Ctl) -> None:
    socket_path = "/run/vmspawnd/io.vmspawnd.Manager"
    described = sh("varlinkctl", "introspect", socket_path, "io.vmspawnd.Manager").stdout
    on_disk = (Path(__file__).resolve().parents[2] / "varlink" / "io.vmspawnd.Manager.varlink").read_text()
    # varlinkctl re-formats and re-orders the description: compare what it declares
    declared = sorted(re.findall(r"^(?:method|error|type) \w+", on_disk, re.M))
    assert sorted(re.findall(r"^(?:method|error|type) \w+", described, re.M)) == declared
    out = sh("varlinkctl", "call", "--more", "--json=short", socket_path, "io.vmspawnd.Manager.List", "{}").stdout
    machines = [json.loads(line)["machine"] for line in out.splitlines() if line.strip()]
    assert [m["name"] for m in machines] == [NAME] and machines[0]["ready"] is True
    one = json.loads(sh("varlinkctl", "call", socket_path, "io.vmspawnd.Manager.Describe",
                        json.dumps({"name": NAME})).stdout)
    assert one["machine"]["state"] == "running"
    bad = sh("varlinkctl", "call", socket_path, "io.vmspawnd.Manager.Describe", '{"name": "../x"}', check=False)
    assert bad.returncode != 0 and "InvalidConfig" in bad.stderr + bad.stdout
    entries = wait_journal("guest is ready", "-o", "json", "-u", "vmspawnd.service", f"MACHINE={NAME}")
    messages = [json.loads(line)["MESSAGE"] for line in entries.splitlines() if line.strip()]
    assert any(m.startswith("guest is ready") for m in messages), messages
