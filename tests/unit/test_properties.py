"""--property= in systemctl set-property syntax becomes typed D-Bus properties, or a clear error."""

import pytest

from vmspawnd.config import ConfigError
from vmspawnd.systemd.properties import UINT64_MAX, describe, parse_properties, parse_property


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
])
def test_supported_properties(assignment, expected):
    assert describe(parse_property(assignment)) == expected


@pytest.mark.parametrize("assignment", [
    "Bogus=1", "MemoryMax", "=1", "MemoryMax=lots", "MemoryMax=150%", "CPUWeight=0", "CPUWeight=x",
    "CPUQuota=fast", "TasksMax=-1", "AllowedCPUs=a-b", "DeviceAllow=/dev/kvm rwx", "DevicePolicy=open",
    "IOReadBandwidthMax=1M", "MemoryAccounting=perhaps",
])
def test_unknown_or_malformed_properties_are_clear_errors(assignment):
    with pytest.raises(ConfigError) as e:
        parse_property(assignment)
    assert e.value.field == "property"
    assert assignment.split("=")[0] in str(e.value) or assignment.startswith("=")


def test_several_properties():
    assert [n for n, _ in parse_properties(["MemoryMax=1G", "TasksMax=infinity"])] == ["MemoryMax", "TasksMax"]
