# SPDX-License-Identifier: LGPL-2.1-or-later
"""Find the QEMU binary and decide between KVM and TCG."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.storage import write_json_atomic
from vmspawnd.values import Tristate

QEMU_NAMES = ("qemu", "qemu-kvm", "/usr/libexec/qemu-kvm")  # looked up first, then qemu-system-<arch>
QEMU_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "i686": "i386"}
VERSION_CACHE = "qemu.version"  # in the runtime base; no machine name has a '.'
VERSIONS_KEPT = 8  # binaries whose versions the cache keeps (the last asked)
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_arm")  # kvm_arm: no module dir on arm, see below


def find_qemu() -> Path:
    """Look up QEMU: qemu, qemu-kvm, /usr/libexec/qemu-kvm, then qemu-system-<host arch>.  The answer
    is kept while $PATH and the directories it names stay as they were (each start asks)."""
    path = os.environ.get("PATH", os.defpath)
    stamps = _directory_stamps(path)
    found = _FOUND.get((path, stamps))
    if found is None:
        found = _look_up_qemu()
        _FOUND.clear()
        if time.time_ns() - max(stamps) > RACY_STAMP_NS:  # else a change within the clock's tick could hide
            _FOUND[(path, stamps)] = found
    return found


_FOUND: dict[tuple[str, tuple[int, ...]], Path] = {}
RACY_STAMP_NS = 100_000_000  # a directory changed this recently may change again with the same mtime


def _directory_stamps(path: str) -> tuple[int, ...]:
    """When each directory QEMU is looked for in last changed (an entry added, removed or renamed)."""
    stamps = []
    for directory in (*path.split(os.pathsep), *(os.path.dirname(n) for n in QEMU_NAMES if os.path.isabs(n))):
        try:
            stamps.append(os.stat(directory or ".").st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def _look_up_qemu() -> Path:
    arch = QEMU_ARCH.get(os.uname().machine)
    candidates = list(QEMU_NAMES)
    if arch:
        candidates.append(f"qemu-system-{arch}")
    for name in candidates:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ConfigError("qemu", "", f"no QEMU binary found (tried {', '.join(candidates)}); "
                      "install qemu-system-x86 (Debian) or put qemu on $PATH")


def qemu_version(binary: Path, cache_dir: Path | None = None) -> tuple[int, int]:
    """QEMU's (major, minor), from ``--version`` (asked once per binary file); (0, 0) if it does not say.

    With ``cache_dir`` (the runtime base) the answer is also kept in :data:`VERSION_CACHE` there, for
    the file with that identity (path, device, inode, size, mtime), beside those of the last few other
    binaries asked (:data:`VERSIONS_KEPT`): the next ``vmspawn`` does not exec QEMU a second time
    (≈ 30 ms) before its VM's QEMU, also where users take turns with two QEMUs.
    """
    try:
        st = binary.stat()
    except OSError:
        return (0, 0)
    identity = [str(binary), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    if (known := _known_versions.get(tuple(identity))) is not None:
        return known
    cache = cache_dir / VERSION_CACHE if cache_dir is not None else None
    kept = _cached_versions(cache) if cache is not None else []
    version = next((found for kept_identity, found in kept if kept_identity == identity), None)
    if version is None:
        version = _version_of(str(binary))
        if cache is not None and version != (0, 0):
            others = [[i, list(v)] for i, v in kept if i[0] != identity[0]][:VERSIONS_KEPT - 1]
            with contextlib.suppress(OSError):
                write_json_atomic(cache, {"versions": [[identity, list(version)], *others]}, durable=False)
    _known_versions[tuple(identity)] = version
    return version


def _cached_versions(cache: Path) -> list[tuple[list, tuple[int, int]]]:
    """(binary's identity, version) of each binary ``cache`` keeps; none if it is missing, not ours, or
    not what we write (an older version's file is written anew)."""
    try:
        with open(cache, "rb") as f:
            if os.fstat(f.fileno()).st_uid != os.geteuid():
                return []
            entries = json.loads(f.read())["versions"]
        return [(identity, (major, minor)) for identity, (major, minor) in entries
                if isinstance(identity, list) and isinstance(major, int) and isinstance(minor, int)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


_known_versions: dict[tuple, tuple[int, int]] = {}  # this process's answers, by the binary's identity


def _version_of(binary: str) -> tuple[int, int]:
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
    if sys_module.is_dir() and os.uname().machine in ("x86_64", "i686"):
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
