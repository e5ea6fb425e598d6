# SPDX-License-Identifier: LGPL-2.1-or-later
"""virtiofs shares: find virtiofsd (Rust or QEMU's C one), build its argv, run it, QEMU args.

One virtiofsd per share: the ``--directory`` root gets tag ``root``, each ``--bind``/``--bind-ro``
tag ``mnt<N>``.  Read-only shares are enforced on the host side: with ``--readonly`` where the
Rust virtiofsd has it, otherwise by running virtiofsd under :mod:`vmspawnd.services.rowrap`, in
a mount namespace of its own where the source is a read-only bind mount — so a guest that
remounts the share read-write still gets EROFS.
"""

from __future__ import annotations

import enum
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.errors import ConfigError
from vmspawnd.identity import ROOT, Identity
from vmspawnd.log import get_logger
from vmspawnd.proc import CAP_SYS_ADMIN, check_socket_path, has_capability
from vmspawnd.qemu import qemu_escape
from vmspawnd.services.runner import RunningService, ServiceRunner, ServiceSpec
from vmspawnd.values import Bind

log = get_logger()

ROOT_TAG = "root"
MAX_ID = 0xFFFFFFFF  # (uid_t)-1 is no ID: valid ones end just below
ROOT_CHARDEV = "rootdir"
#: Where upstream looks (after $PATH), then QEMU's C virtiofsd (Debian 12's qemu-system-common).
VIRTIOFSD_PATHS = (Path("/usr/libexec/virtiofsd"), Path("/usr/lib/virtiofsd"), Path("/usr/lib/qemu/virtiofsd"))
#: run as its own program, not imported here (it loads ctypes: ≈ 2 ms of each command's start)
ROWRAP = Path(__file__).with_name("rowrap.py")


class Flavour(enum.Enum):
    RUST = "rust"  # gitlab.com/virtio-fs/virtiofsd: --shared-dir, --sandbox=, maybe --readonly
    C = "c"  # QEMU ≤ 8.0's tools/virtiofsd: -o source=, -o sandbox=


@dataclass(frozen=True)
class Virtiofsd:
    """An installed virtiofsd and what its ``--help`` says it supports."""

    path: Path
    flavour: Flavour
    readonly: bool = False  # Rust: --readonly
    translate_ids: bool = False  # Rust: --translate-uid/--translate-gid


@dataclass(frozen=True)
class UidMap:
    """Guest IDs ``guest_first…+count`` are host IDs ``host_first…`` (GIDs: ``host_gid_first…`` if
    given, else the same numbers)."""

    guest_first: int
    host_first: int
    count: int
    host_gid_first: int | None = None
    squash_others: bool = False  # every other guest ID creates files as host_first (no guest root on the host)

    @property
    def identity(self) -> bool:
        return (self.guest_first == self.host_first and self.host_gid_first in (None, self.guest_first)
                and not self.squash_others)

    def word(self) -> str:
        return f"map:{self.guest_first}:{self.host_first}:{self.count}"

    def gid_word(self) -> str:
        return f"map:{self.guest_first}:{self._host_gid}:{self.count}"

    @property
    def _host_gid(self) -> int:
        return self.host_first if self.host_gid_first is None else self.host_gid_first

    def translate_args(self) -> list[str]:
        """virtiofsd's --translate-uid/--translate-gid rules (the ranges must not overlap)."""
        args = ["--translate-uid", self.word(), "--translate-gid", self.gid_word()]
        if self.squash_others:
            end = self.guest_first + self.count
            for option, host in (("--translate-uid", self.host_first), ("--translate-gid", self._host_gid)):
                if self.guest_first > 0:
                    args += [option, f"squash-guest:0:{host}:{self.guest_first}"]
                if end < MAX_ID:
                    args += [option, f"squash-guest:{end}:{host}:{MAX_ID - end}"]
        return args


# ----------------------------------------------------------------------------- discovery
@functools.cache
def _probe(path: str, _mtime_ns: int) -> Virtiofsd | None:
    try:
        proc = subprocess.run([path, "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if "--shared-dir" in text:
        return Virtiofsd(Path(path), Flavour.RUST, readonly="--readonly" in text,
                         translate_ids="--translate-uid" in text)
    if "source=" in text and "-o " in text:
        return Virtiofsd(Path(path), Flavour.C)
    return None


def probe_virtiofsd(path: Path) -> Virtiofsd | None:
    """Tell the flavour (and options) of the virtiofsd at ``path`` from its ``--help``; None if it is not one."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not os.access(path, os.X_OK) or not path.is_file():
        return None
    return _probe(str(path), st.st_mtime_ns)


def find_virtiofsd(search_path: str | None = None, candidates: Iterable[Path] = VIRTIOFSD_PATHS) -> Virtiofsd:
    """``virtiofsd`` in $PATH, /usr/libexec/virtiofsd, /usr/lib/virtiofsd, /usr/lib/qemu/virtiofsd."""
    found = shutil.which("virtiofsd", path=search_path)
    tried = [*([Path(found)] if found else []), *candidates]
    for path in tried:
        virtiofsd = probe_virtiofsd(path)
        if virtiofsd is not None:
            return virtiofsd
    raise ConfigError("virtiofsd", "", "no virtiofsd found (looked in $PATH, "
                      + ", ".join(str(p) for p in candidates) + "); install virtiofsd or qemu-system-common")


def in_chroot(mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """True when our root directory is not a mount point (a chroot, some containers)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return False
    return not any(len(fields) > 4 and fields[4] == "/" for fields in (line.split() for line in lines))


def _has_cap_sys_admin(status: Path = Path("/proc/self/status")) -> bool:
    return has_capability(CAP_SYS_ADMIN, status)


def choose_sandbox(mountinfo: Path = Path("/proc/self/mountinfo"), status: Path = Path("/proc/self/status")) -> str:
    """``namespace``, or ``chroot`` where namespace mode fails (pivot_root needs / to be a mount point)."""
    if in_chroot(mountinfo):
        return "chroot"
    if not _has_cap_sys_admin(status):
        return "chroot"
    return "namespace"


# ----------------------------------------------------------------------------- --bind
def bind_tag(index: int) -> str:
    """The virtiofs tag (and QEMU chardev id) of the ``index``-th bind: ``mnt<index>``."""
    return f"mnt{index}"


def _fstab_escape(text: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" or ord(c) < 0x20 else c for c in text)


def fstab_extra(binds: Iterable[Bind]) -> str:
    """The ``fstab.extra`` credential: ``mnt<N> <dst> virtiofs rw|ro,x-initrd.mount`` per bind."""
    return "".join(f"{bind_tag(i)} {_fstab_escape(str(b.destination))} virtiofs "
                   f"{'ro' if b.read_only else 'rw'},x-initrd.mount\n" for i, b in enumerate(binds))


# ----------------------------------------------------------------------------- argv
def _fuse_opt_escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def rowrap_argv(source: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``source`` read-only in a private mount namespace (no shell involved)."""
    return [sys.executable, "-I", "-S", str(ROWRAP), str(source), "--", *argv]


def virtiofsd_argv(virtiofsd: Virtiofsd, share_dir: Path, *, read_only: bool, sandbox: str,
                   uid_map: UidMap | None = None) -> list[str]:
    """The argv sharing ``share_dir`` on the listening socket that is its standard input (``--fd=0``;
    wrapped by rowrap when read-only needs it)."""
    if uid_map is not None and not uid_map.identity and not (virtiofsd.flavour is Flavour.RUST
                                                             and virtiofsd.translate_ids):
        raise ConfigError("private-users", f"{uid_map.host_first}:{uid_map.count}",
                          f"{virtiofsd.path} cannot translate UIDs (needs the Rust virtiofsd with --translate-uid)")
    if virtiofsd.flavour is Flavour.C:
        if sandbox not in ("namespace", "chroot"):
            raise ValueError(f"QEMU's virtiofsd has no sandbox mode {sandbox!r}")
        argv = [str(virtiofsd.path), "--fd=0", "-o", f"source={_fuse_opt_escape(share_dir)}",
                "-o", "cache=auto", "-o", f"sandbox={sandbox}"]
        wrap = read_only
    else:
        if sandbox not in ("namespace", "chroot", "none"):
            raise ValueError(f"unknown virtiofsd sandbox mode {sandbox!r}")
        argv = [str(virtiofsd.path), "--fd=0", f"--shared-dir={share_dir}", f"--sandbox={sandbox}"]
        if read_only and virtiofsd.readonly:
            argv.append("--readonly")
        if uid_map is not None and virtiofsd.translate_ids:
            argv += uid_map.translate_args()
        wrap = read_only and not virtiofsd.readonly
    return rowrap_argv(share_dir, argv) if wrap else argv


async def start_virtiofsd(runner: ServiceRunner, machine: str, index_or_root: int | str, share_dir: Path,
                          socket_path: Path, read_only: bool, *, virtiofsd: Virtiofsd | None = None,
                          sandbox: str | None = None, uid_map: UidMap | None = None,
                          bound_to: str | None = None, identity: Identity = ROOT) -> RunningService:
    """Run a virtiofsd for ``share_dir`` (``index_or_root``: bind index or ``"root"``) as ``identity``,
    socket-activated on ``socket_path`` (as upstream's: QEMU need not wait for it to come up, ≈ 4 ms
    here).  As a user it runs without a sandbox (which needs privileges): the kernel's permissions for
    that user are the limit."""
    virtiofsd = virtiofsd or find_virtiofsd()
    check_socket_path(socket_path)
    if identity.switches:
        sandbox = "none"
    argv = virtiofsd_argv(virtiofsd, share_dir, read_only=read_only,
                          sandbox=sandbox or choose_sandbox(), uid_map=uid_map)
    spec = ServiceSpec(name=f"vmspawnd-{machine}-virtiofsd-{index_or_root}", argv=tuple(argv),
                       description=f"virtiofs share {share_dir} for VM {machine}{' (read-only)' if read_only else ''}",
                       bound_to=bound_to, listen_on=socket_path, identity=identity)
    return await runner.start(spec)


def qemu_virtiofs_args(tag: str, socket_path: Path, chardev_id: str) -> list[str]:
    """``-chardev socket,…`` + ``-device vhost-user-fs-pci,queue-size=1024,chardev=ID,tag=TAG``."""
    return ["-chardev", f"socket,id={chardev_id},path={qemu_escape(socket_path)}",
            "-device", f"vhost-user-fs-pci,queue-size=1024,chardev={chardev_id},tag={tag}"]


def qemu_shared_memory_args(ram_mib: int) -> list[str]:
    """Guest RAM as a shared memfd (vhost-user needs it); ``ram_mib`` must equal ``-m``.

    ``-machine memory-backend=mem`` (QEMU ≥ 5.0; checked with 7.2) merges with the other
    ``-machine`` options, so no NUMA node is needed.
    """
    return ["-object", f"memory-backend-memfd,id=mem,size={ram_mib}M,share=on", "-machine", "memory-backend=mem"]
