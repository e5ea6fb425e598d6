# SPDX-License-Identifier: LGPL-2.1-or-later
"""``--property=NAME=VALUE`` in ``systemctl set-property`` syntax → typed D-Bus unit properties:
(name, D-Bus signature, value), made into variants only where they are sent (systemd/scope.py), so
that checking a machine's settings needs no D-Bus code (nor asyncio, which that imports).

Supported families: memory, CPU, tasks, IO and device access (plus Delegate).  An unknown or
malformed assignment is a ConfigError naming the property, raised before any VM starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vmspawnd.errors import ConfigError
from vmspawnd.values import is_decimal, parse_bool, parse_signal, parse_size

UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
_TIME_UNITS = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 1_000_000, "sec": 1_000_000, "": 1_000_000,
               "m": 60_000_000, "min": 60_000_000, "h": 3_600_000_000, "hr": 3_600_000_000,
               "d": 86_400_000_000, "w": 604_800_000_000}

Property = tuple[str, str, Any]  # (name, D-Bus signature, value)


def _fail(name: str, value: str, reason: str) -> ConfigError:
    return ConfigError("property", f"{name}={value}", reason)


def _percent(name: str, value: str) -> float | None:
    if not value.endswith("%"):
        return None
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?%", value):
        raise _fail(name, value, "expected a percentage such as 50%")
    pct = float(value[:-1])
    if not 0 <= pct <= 100:
        raise _fail(name, value, "percentage must be between 0% and 100%")
    return pct


def _limit(name: str, value: str, scale_name: str | None) -> list[Property]:
    """Bytes/count limits: a number (with K/M/G… for memory), ``infinity``, or a percentage."""
    if value == "infinity":
        return [(name, "t", UINT64_MAX)]
    pct = _percent(name, value)
    if pct is not None:
        if scale_name is None:
            raise _fail(name, value, "percentages are not supported here")
        return [(scale_name, "u", round(pct / 100 * UINT32_MAX))]
    try:
        if name.startswith("Memory"):
            number = parse_size(name, value, zero_ok=True)
        elif is_decimal(value):
            number = int(value)
        else:
            raise ValueError(value)
    except (ConfigError, ValueError):
        raise _fail(name, value, "expected a number, 'infinity' or a percentage") from None
    return [(name, "t", number)]


def _weight(name: str, value: str) -> list[Property]:
    if not is_decimal(value) or not 1 <= int(value) <= 10000:
        raise _fail(name, value, "expected a weight from 1 to 10000")
    return [(name, "t", int(value))]


def _boolean(name: str, value: str) -> list[Property]:
    try:
        return [(name, "b", parse_bool("property", value))]
    except ConfigError:
        raise _fail(name, value, "expected a boolean") from None


def _cpu_quota_any(name: str, value: str) -> list[Property]:
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)%", value)
    if not m or float(m.group(1)) <= 0:
        raise _fail(name, value, "expected a positive percentage such as 50% (200% = two CPUs)")
    return [("CPUQuotaPerSecUSec", "t", round(float(m.group(1)) * 10_000))]


def _timespan(name: str, value: str) -> list[Property]:
    usec_name = name[:-3] + "USec" if name.endswith("Sec") else name
    if value == "infinity":
        return [(usec_name, "t", UINT64_MAX)]
    m = re.fullmatch(r"([0-9]+)\s*([a-z]*)", value)
    if not m or m.group(2) not in _TIME_UNITS:
        raise _fail(name, value, "expected a time span such as 100ms, 1s, 1h or infinity")
    return [(usec_name, "t", int(m.group(1)) * _TIME_UNITS[m.group(2)])]


def _cpu_set(name: str, value: str) -> list[Property]:
    cpus: set[int] = set()
    for part in filter(None, re.split(r"[\s,]+", value)):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise _fail(name, value, "expected CPU indices or ranges such as 0-3,6")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi > 8191:
            raise _fail(name, value, "invalid CPU range")
        cpus.update(range(lo, hi + 1))
    mask = bytearray((max(cpus) // 8 + 1) if cpus else 0)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return [(name, "ay", bytes(mask))]


def _device_limit(name: str, value: str, sizes: bool) -> list[Property]:
    path, _, amount = value.rpartition(" ")
    if not path.startswith("/"):
        raise _fail(name, value, "expected 'DEVICE-PATH VALUE'")
    try:
        number = parse_size(name, amount) if sizes else int(amount)
    except (ConfigError, ValueError):
        raise _fail(name, value, "expected 'DEVICE-PATH VALUE' with a number") from None
    return [(name, "a(st)", [[path, number]])]


def _device_weight(name: str, value: str) -> list[Property]:
    path, _, weight = value.rpartition(" ")
    if not path.startswith("/") or not is_decimal(weight) or not 1 <= int(weight) <= 10000:
        raise _fail(name, value, "expected 'DEVICE-PATH WEIGHT' with a weight from 1 to 10000")
    return [(name, "a(st)", [[path, int(weight)]])]


def _device_allow(name: str, value: str) -> list[Property]:
    parts = value.split()
    if not 1 <= len(parts) <= 2 or not (parts[0].startswith(("/", "char-", "block-"))):
        raise _fail(name, value, "expected 'DEVICE [r][w][m]'")
    access = parts[1] if len(parts) > 1 else "rwm"
    if not access or set(access) - set("rwm"):
        raise _fail(name, value, "access must be a combination of r, w and m")
    return [(name, "a(ss)", [[parts[0], access]])]


def _choice(*allowed: str) -> Callable[[str, str], list[Property]]:
    def parse(name: str, value: str) -> list[Property]:
        if value not in allowed:
            raise _fail(name, value, f"expected {', '.join(allowed[:-1])} or {allowed[-1]}")
        return [(name, "s", value)]
    return parse


def _signal(name: str, value: str) -> list[Property]:
    try:
        return [(name, "i", parse_signal("property", value))]
    except ConfigError as e:
        raise _fail(name, value, e.reason) from None


PARSERS: dict[str, Callable[[str, str], list[Property]]] = {
    "MemoryAccounting": _boolean,
    "MemoryMin": lambda n, v: _limit(n, v, "MemoryMinScale"),
    "MemoryLow": lambda n, v: _limit(n, v, "MemoryLowScale"),
    "MemoryHigh": lambda n, v: _limit(n, v, "MemoryHighScale"),
    "MemoryMax": lambda n, v: _limit(n, v, "MemoryMaxScale"),
    "MemorySwapMax": lambda n, v: _limit(n, v, "MemorySwapMaxScale"),
    "CPUAccounting": _boolean,
    "CPUWeight": _weight,
    "StartupCPUWeight": _weight,
    "CPUQuota": _cpu_quota_any,
    "CPUQuotaPeriodSec": _timespan,
    "AllowedCPUs": _cpu_set,
    "StartupAllowedCPUs": _cpu_set,
    "TasksAccounting": _boolean,
    "TasksMax": lambda n, v: _limit(n, v, "TasksMaxScale"),
    "IOAccounting": _boolean,
    "IOWeight": _weight,
    "StartupIOWeight": _weight,
    "IODeviceWeight": _device_weight,
    "IOReadBandwidthMax": lambda n, v: _device_limit(n, v, True),
    "IOWriteBandwidthMax": lambda n, v: _device_limit(n, v, True),
    "IOReadIOPSMax": lambda n, v: _device_limit(n, v, False),
    "IOWriteIOPSMax": lambda n, v: _device_limit(n, v, False),
    "DeviceAllow": _device_allow,
    "DevicePolicy": _choice("auto", "closed", "strict"),
    "Delegate": _boolean,
    "MemoryZSwapMax": lambda n, v: _limit(n, v, None),
    "IPAccounting": _boolean,
    "ManagedOOMMemoryPressure": _choice("auto", "kill"),
    "ManagedOOMSwap": _choice("auto", "kill"),
    "ManagedOOMPreference": _choice("none", "avoid", "omit"),
    "RuntimeMaxSec": _timespan,
    "TimeoutStopSec": _timespan,
    "KillMode": _choice("control-group", "mixed", "process", "none"),
    "KillSignal": _signal,
    "SendSIGKILL": _boolean,
}


def parse_property(assignment: str) -> list[Property]:
    """Parse one ``NAME=VALUE``; raise ConfigError for unknown names and malformed values."""
    name, sep, value = assignment.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise ConfigError("property", assignment, "expected NAME=VALUE")
    parser = PARSERS.get(name)
    if parser is None:
        raise ConfigError("property", assignment, f"unknown or unsupported property {name} "
                          f"(supported: {', '.join(sorted(PARSERS))})")
    return parser(name, value)


def parse_properties(assignments: tuple[str, ...] | list[str]) -> list[Property]:
    return [p for a in assignments for p in parse_property(a)]
