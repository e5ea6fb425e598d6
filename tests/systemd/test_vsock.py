# SPDX-License-Identifier: LGPL-2.1-or-later
"""vhost-device-vsock under a real systemd: the backend as a transient unit, machined told the
hybrid address (and no AF_VSOCK CID that does not exist), the guest's READY over it.

Only the forky tree has the package (trixie has none): elsewhere these tests are skipped.
"""

from __future__ import annotations

import shutil

import pytest

from tests.systemd.helpers import (
    MACHINED_VARLINK,
    NAME,
    WITH_GUEST,
    Ctl,
    alive,
    sh,
    unit_properties,
    varlink_call,
    wait_inactive,
)

VSOCK_UNIT = f"vmspawnd-{NAME}-vsock.service"
#: (the daemon runs as a unit, in PID 1's environment: tests/conftest.py's $VMSPAWND_VHOST_DEVICE_VSOCK is not its)
BACKEND = shutil.which("vhost-device-vsock")
pytestmark = [*WITH_GUEST, pytest.mark.skipif(BACKEND is None,
                                              reason="vhost-device-vsock is not installed (Debian forky has it)")]


def test_the_backend_is_a_transient_unit_and_machined_gets_the_hybrid_address(vm: Ctl) -> None:
    st = vm.status()
    assert st["ready"] and st["vsockBackend"] == "vhost-device-vsock"  # READY=1 came over vsock
    runtime = st["runtimeDirectory"]
    assert st["sshAddress"] == f"vsock-mux/{runtime}/vsock"
    assert VSOCK_UNIT in st["units"]
    props = unit_properties(VSOCK_UNIT, "ActiveState", "ExecStart", "BindsTo")
    assert props["ActiveState"] == "active"
    assert f"path={BACKEND}" in props["ExecStart"] and f"--uds-path={runtime}/vsock" in props["ExecStart"]
    assert props["BindsTo"].endswith(".scope")  # it ends with the VM
    (machine,) = varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": NAME})
    assert machine["parameters"]["sshAddress"] == st["sshAddress"]
    assert "vSockCid" not in machine["parameters"]  # there is no AF_VSOCK address to give
    assert machine["parameters"]["sshPrivateKeyPath"] == f"{runtime}/ssh-ed25519"
    main_pid = int(unit_properties(VSOCK_UNIT, "MainPID")["MainPID"])

    sh("systemctl", "restart", "vmspawnd.service")  # the backend is a helper of the run: adopted
    again = vm.status()
    assert (again["pid"], again["vsockBackend"]) == (st["pid"], "vhost-device-vsock") and alive(main_pid)
    vm("stop", NAME, "--timeout=30")
    wait_inactive(VSOCK_UNIT)
    assert not alive(main_pid)
