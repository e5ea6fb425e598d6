# SPDX-License-Identifier: LGPL-2.1-or-later
"""vhost-device-vsock under a real systemd: the backend as a transient unit, machined told the
hybrid address (and no AF_VSOCK CID that does not exist), the guest's READY over it.

The forky tree has the package, and the bookworm one forky's (as `make setup` gives a Debian 12 host);
trixie has none, and these tests are skipped there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.systemd.helpers import (
    GUEST_DIR,
    MACHINED_VARLINK,
    NAME,
    WITH_GUEST,
    Ctl,
    alive,
    machined_record,
    sh,
    systemd_version,
    unit_properties,
    varlink_call,
    wait_inactive,
)
from vmspawnd.systemd.machined import MACHINED_VARLINK_SINCE
from vmspawnd.testing.guest import GUEST_WORDS

VSOCK_UNIT = f"vmspawnd-{NAME}-vsock.service"
#: (the daemon runs as a unit, in PID 1's environment: tests/conftest.py's $VMSPAWND_VHOST_DEVICE_VSOCK is not its)
BACKEND = shutil.which("vhost-device-vsock")
pytestmark = [*WITH_GUEST, pytest.mark.skipif(
    BACKEND is None, reason="vhost-device-vsock is not installed (the forky and bookworm trees have it)")]


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
    machine = machined_record(NAME)
    assert machine is not None and "vSockCid" not in machine  # there is no AF_VSOCK address to give
    if systemd_version() >= MACHINED_VARLINK_SINCE:  # (machined over D-Bus learns no SSH address)
        assert machine["sshAddress"] == st["sshAddress"]
        assert machine["sshPrivateKeyPath"] == f"{runtime}/ssh-ed25519"
    main_pid = int(unit_properties(VSOCK_UNIT, "MainPID")["MainPID"])

    sh("systemctl", "restart", "vmspawnd.service")  # the backend is a helper of the run: adopted
    again = vm.status()
    assert (again["pid"], again["vsockBackend"]) == (st["pid"], "vhost-device-vsock") and alive(main_pid)
    vm("stop", NAME, "--timeout=30")
    wait_inactive(VSOCK_UNIT)
    assert not alive(main_pid)


SSHD_INITRD = Path(os.environ.get("VMSPAWND_TEST_SSHD_INITRD", "/nonexistent"))


@pytest.mark.skipif(not SSHD_INITRD.is_file(), reason="no sshd initrd bound in ($VMSPAWND_TEST_SSHD_INITRD)")
@pytest.mark.skipif(systemd_version() < MACHINED_VARLINK_SINCE,
                    reason=f"systemd-ssh-proxy and machined's SSH address are new in {MACHINED_VARLINK_SINCE} "
                           "(`vmspawnctl ssh` reaches the guest without them: tests/vm/test_vsock.py)")
def test_systemds_own_ssh_proxy_reaches_the_guest_at_the_address_machined_was_told(installed_units: Path) -> None:
    """ssh's stock configuration here sends vsock-mux/… through systemd-ssh-proxy: our hybrid socket
    speaks its protocol, with the key --pass-ssh-key made."""
    sh("systemctl", "start", "vmspawnd.socket")
    ctl = Ctl(installed_units)
    ctl("create", "sshd1", f"--linux={GUEST_DIR / 'vmlinuz'}", f"--initrd={GUEST_DIR / 'initrd.img'}",
        f"--initrd={SSHD_INITRD}", "--ram=256M", "--console=read-only", "--firmware=bios", *GUEST_WORDS,
        "test.sshd=1", "test.action=hang")
    ctl("start", "sshd1")
    try:
        st = ctl.wait(lambda s: s["ready"], name="sshd1")
        (machine,) = varlink_call(MACHINED_VARLINK, "io.systemd.Machine.List", {"name": "sshd1"})
        address, key = machine["parameters"]["sshAddress"], machine["parameters"]["sshPrivateKeyPath"]
        assert address == st["sshAddress"] and address.startswith("vsock-mux/")
        plain = sh("ssh", "-i", key, "-o", "BatchMode=yes", address, "cat /proc/cmdline", check=False)
        assert plain.returncode == 0 and "test.sshd=1" in plain.stdout, plain.stderr
        ours = ctl("ssh", "sshd1", "-o", "BatchMode=yes", "--", "echo", "through-vmspawnctl")
        assert ours.stdout.strip() == "through-vmspawnctl"
    finally:
        ctl("kill", "sshd1", check=False)
        ctl("remove", "sshd1", check=False)
