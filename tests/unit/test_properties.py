# SPDX-License-Identifier: LGPL-2.1-or-later
"""--property= in systemctl set-property syntax becomes typed D-Bus properties, or a clear error."""

import pytest

from vmspawnd.errors import ConfigError
from vmspawnd.systemd.properties import UINT64_MAX, parse_properties, parse_property


@pytest.mark.parametrize("assignment,expected", [
    ("MemoryMax=512M", [("MemoryMax", "t", 512 << 20)]),
    ("MemoryHigh=infinity", [("MemoryHigh", "t", UINT64_MAX)]),
    ("MemoryMax=50%", [("MemoryMaxScale", "u", 2147483648)]),
    ("MemoryAccounting=yes", [("MemoryAccounting", "b", True)]),
    ("CPUWeight=200", [("CPUWeight", "t", 200)]),
    ("CPUQuota=150%", [("CPUQuotaPerSecUSec", "t", 1_500_000)]),
    ("CPUQuotaPeriodSec=10ms", [("CPUQuotaPeriodUSec", "t", 10_000)]),
    ("AllowedCPUs=0-2,9", [("AllowedCPUs", "ay", bytes([0b111, 0b10]))]),
    ("TasksMax=64", [("TasksMax", "t", 64)]),
    ("IOWeight=50", [("IOWeight", "t", 50)]),
    ("IOReadBandwidthMax=/dev/vda 1M", [("IOReadBandwidthMax", "a(st)", [["/dev/vda", 1 << 20]])]),
    ("IOWriteIOPSMax=/dev/vda 100", [("IOWriteIOPSMax", "a(st)", [["/dev/vda", 100]])]),
    ("DeviceAllow=/dev/kvm rw", [("DeviceAllow", "a(ss)", [["/dev/kvm", "rw"]])]),
    ("DevicePolicy=closed", [("DevicePolicy", "s", "closed")]),
    ("MemoryZSwapMax=0", [("MemoryZSwapMax", "t", 0)]),
    ("RuntimeMaxSec=2h", [("RuntimeMaxUSec", "t", 7_200_000_000)]),
    ("TimeoutStopSec=infinity", [("TimeoutStopUSec", "t", UINT64_MAX)]),
    ("ManagedOOMMemoryPressure=kill", [("ManagedOOMMemoryPressure", "s", "kill")]),
    ("KillMode=mixed", [("KillMode", "s", "mixed")]),
    ("KillSignal=SIGINT", [("KillSignal", "i", 2)]),
    ("SendSIGKILL=no", [("SendSIGKILL", "b", False)]),
])
def test_supported_properties(assignment, expected):
    assert parse_property(assignment) == expected


@pytest.mark.parametrize("assignment", [
    "Bogus=1", "MemoryMax", "=1", "MemoryMax=lots", "MemoryMax=150%", "CPUWeight=0", "CPUWeight=x",
    "CPUQuota=fast", "TasksMax=-1", "AllowedCPUs=a-b", "DeviceAllow=/dev/kvm rwx", "DevicePolicy=open",
    "IOReadBandwidthMax=1M", "MemoryAccounting=perhaps", "TasksMax=1_000", "TasksMax=٣", "CPUQuota=٣%",
    "MemoryZSwapMax=10%", "KillMode=all", "KillSignal=SIGNOPE", "RuntimeMaxSec=1fortnight",
])
def test_unknown_or_malformed_properties_are_clear_errors(assignment):
    with pytest.raises(ConfigError) as e:
        parse_property(assignment)
    assert e.value.field == "property"
    assert assignment.split("=")[0] in str(e.value) or assignment.startswith("=")


def test_several_properties():
    assert [n for n, _, _ in parse_properties(["MemoryMax=1G", "TasksMax=infinity"])] == ["MemoryMax", "TasksMax"]


def test_scope_names_and_properties():
    from vmspawnd.systemd.scope import scope_properties, scope_unit_name
    from vmspawnd.values import mangle_slice

    assert scope_unit_name("web-1") == "machine-web\\x2d1.scope"  # as machined names it
    assert mangle_slice("vms") == "vms.slice" and mangle_slice("a.slice") == "a.slice"
    props = dict((n, (v.signature, v.value)) for n, v in scope_properties("web", 42, "vms.slice",
                                                                          parse_property("TasksMax=10")))
    assert props["PIDs"] == ("au", [42])
    assert props["Slice"] == ("s", "vms.slice")
    assert props["TasksMax"] == ("t", 10)


def test_machined_registration_parameters():
    import os
    import uuid

    from vmspawnd.qemu.vsock import GuestVsock, VsockBackend
    from vmspawnd.systemd.machined import Registration

    u = uuid.uuid4()
    kernel = GuestVsock(VsockBackend.KERNEL, 1234)
    params = Registration("web", os.getpid(), machine_id=u, vsock=kernel).parameters()
    assert params["class"] == "vm" and params["service"] == "vmspawnd" and params["name"] == "web"
    assert params["id"] == u.hex
    assert params["leaderProcessId"]["pid"] == os.getpid() and params["leaderProcessId"]["pidfdId"] > 0
    assert params["vSockCid"] == 1234 and params["sshAddress"] == "vsock/1234"
    assert "allocateUnit" not in params  # we made the scope ourselves; machined adopts it
    assert "sshPrivateKeyPath" not in params
    from pathlib import Path

    keyed = Registration("web", os.getpid(), vsock=kernel, ssh_private_key=Path("/run/x/ssh-ed25519")).parameters()
    assert keyed["sshPrivateKeyPath"] == "/run/x/ssh-ed25519"
    # over vhost-device-vsock there is no AF_VSOCK address to give: ssh goes through the hybrid socket
    hybrid = GuestVsock(VsockBackend.VHOST_USER, 1234, socket=Path("/run/x/vsock"))
    muxed = Registration("web", os.getpid(), vsock=hybrid).parameters()
    assert "vSockCid" not in muxed and muxed["sshAddress"] == "vsock-mux//run/x/vsock"


def test_bad_slice_and_property_fail_at_parse_time(tmp_path):
    from vmspawnd.options import parse_vmspawn_args

    k = tmp_path / "k"
    k.write_bytes(b"x")
    for args in (["--slice=../x"], ["--property=MemoryMax=lots"], ["--register=maybe"]):
        with pytest.raises(ConfigError):
            parse_vmspawn_args([f"--linux={k}", "--firmware=none", *args])


def test_machined_registration_over_dbus_for_a_machined_without_varlink():
    """systemd < 256 (Debian 12's 252): RegisterMachine(name, id bytes, service, class, leader, root)."""
    import uuid
    from pathlib import Path

    from vmspawnd.systemd.machined import Registration

    u = uuid.uuid4()
    assert Registration("web", 42, machine_id=u, root_directory=Path("/srv/tree")).dbus_arguments() == [
        "web", u.bytes, "vmspawnd", "vm", 42, "/srv/tree"]
    assert Registration("web", 42).dbus_arguments() == ["web", b"", "vmspawnd", "vm", 42, ""]  # (machined: none)
