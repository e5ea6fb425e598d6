# SPDX-License-Identifier: LGPL-2.1-or-later
"""Find the QEMU binary and decide between KVM and TCG."""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.values import Tristate

QEMU_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "i686": "i386"}
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_arm")  # kvm_arm: no module dir on arm, see below


def find_qemu() -> Path:
    """Look up QEMU: qemu, qemu-kvm, /usr/libexec/qemu-kvm, then qemu-system-<host arch>."""
    arch = QEMU_ARCH.get(platform.machine())
    candidates = ["qemu", "qemu-kvm", "/usr/libexec/qemu-kvm"]
    if arch:
        candidates.append(f"qemu-system-{arch}")
    for name in candidates:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ConfigError("qemu", "", f"no QEMU binary found (tried {', '.join(candidates)}); "
                      "install qemu-system-x86 (Debian) or put qemu on $PATH")


def qemu_version(binary: Path) -> tuple[int, int]:
    """QEMU's (major, minor), from ``--version`` (asked once per binary); (0, 0) if it does not say."""
    try:
        return _version_of(str(binary), binary.stat().st_mtime_ns)
    except OSError:
        return (0, 0)


@functools.lru_cache(maxsize=8)
def _version_of(binary: str, _mtime: int) -> tuple[int, int]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def kvm_problem(sys_module: Path = Path("/sys/module"), device: str = "/dev/kvm") -> str | None:
    """Why KVM cannot run an ordinary guest here, or None if it can.

    "/dev/kvm exists" is not enough: a PVM-backed /dev/kvm (module kvm_pvm, common in nested
    cloud VMs) opens fine but only runs PVM-enabled guest kernels.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    os.close(fd)
    if sys_module.is_dir() and platform.machine() in ("x86_64", "i686"):
        loaded = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if (sys_module / m).exists()}
        if "kvm_pvm" in loaded and not loaded & {"kvm_intel", "kvm_amd"}:
            return f"{device} is backed by kvm_pvm, which cannot run ordinary guest kernels"
        if not loaded:
            return f"{device} has no hardware backend (neither kvm_intel nor kvm_amd is loaded)"
    return None


@dataclass(frozen=True)
class Accelerator:
    """The accelerator QEMU will use, and why."""

    kvm: bool
    reason: str


def choose_accelerator(setting: Tristate) -> Accelerator:
    """--kvm=yes forces KVM, no forces TCG, auto uses KVM only where it really works."""
    if setting is Tristate.YES:
        return Accelerator(True, "--kvm=yes")
    if setting is Tristate.NO:
        return Accelerator(False, "--kvm=no")
    problem = kvm_problem()
    if problem:
        return Accelerator(False, f"{problem}; using TCG (software emulation)")
    return Accelerator(True, "/dev/kvm works")
