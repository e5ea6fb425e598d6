# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd tier's test harness: a real systemd 257 (or 252, or 262) + machined in a throw-away container.

The host (Debian 12, PID 1 not systemd) cannot run the project's units or talk to a varlink
machined, so this module:

1. installs what it needs on the host (``systemd-container`` for ``systemd-nspawn``,
   ``mmdebstrap``) when it runs as root;
2. builds a Debian trixie (``--suite=forky``: systemd 262; ``--suite=bookworm``: 252) tree with mmdebstrap, cached under
   ``${VMSPAWND_CACHE:-~/.cache/vmspawnd}/systemd-tree/<key>`` where the key hashes the package
   list, the suite and :data:`HARNESS_VERSION` (built in a temporary directory, then renamed);
3. adds a virtualenv with the project installed editable at :data:`VENV` inside that tree, keyed
   by the project's ``pyproject.toml`` (the editable install points at :data:`SRC`, where the live
   source is bind-mounted read-only while the container runs);
4. boots the tree with the host's ``systemd-nspawn``: from a shell that first moved itself into a
   cgroup of its own, in a private mount namespace with a tmpfs ``/run``, with
   ``--register=no --keep-unit --volatile=overlay`` (every write of the container lands in a
   tmpfs, so the cached tree stays clean and several runs may share it), and the source
   ``--bind-ro``'d in; no host device node is ever bound in;
5. waits for ``systemctl is-system-running`` to say running/degraded; machined is left alone, as
   after a real boot (on 257 nothing starts it until something asks for it over D-Bus);
6. runs commands inside through ``nsenter`` + ``systemd-run --pipe --wait --collect``;
7. tears everything down on every path (``SIGTERM`` to nspawn = orderly poweroff, then
   ``cgroup.kill``, then removal of the cgroups it made) and checks, with a :class:`HostSnapshot`
   taken before and after, that no mount, cgroup, process, ``/run`` entry or device node of the
   host changed.

Command line (also ``make test-systemd``)::

    python -m tests.systemd.container test [PYTEST ARGS...]   # build, boot, pytest -m systemd inside
                                                              # (with the host's test guest bound in)
    python -m tests.systemd.container run -- CMD...           # boot, run CMD inside, tear down
    python -m tests.systemd.container shell                   # boot, interactive shell inside
    python -m tests.systemd.container build                   # only build/refresh the cached tree
    python -m tests.systemd.container cleanup                 # remove what a killed run left

Only the standard library is used: the harness runs with any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Bump when the way the tree or the venv is made changes: it is part of both cache keys.
HARNESS_VERSION = "1"

SUITE = "trixie"
#: The suites a tree can be built from, with the systemd each brings (``--suite``; ``make test-systemd``
#: runs all): bookworm's 252 is Debian 12's (machined has no varlink interface yet), trixie's 257 has no
#: per-machine control sockets, forky's 262 has them.
SUITES: dict[str, str] = {"bookworm": "252", "trixie": "257", "forky": "262"}

HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # bound in for pip (the `make install` test)
CA_INSIDE = "/run/host-ca.crt"

#: What the tree holds (mmdebstrap --variant=minbase --include=...; Recommends are not installed).
PACKAGES: tuple[str, ...] = (
    # the service manager, the bus, machined and nspawn; polkit (who may manage VMs)
    "systemd", "systemd-sysv", "dbus", "systemd-container", "polkitd",
    # a Python 3.13 able to build systemd-python from PyPI
    "python3", "python3-venv", "python3-dev", "gcc", "libc6-dev", "pkg-config", "libsystemd-dev",
    # what vmspawn drives
    "qemu-system-x86", "qemu-utils", "seabios", "ipxe-qemu", "ovmf", "swtpm", "swtpm-tools", "virtiofsd",
    # test guest and tooling
    "busybox-static", "cpio", "procps", "make",
    # --pass-ssh-key
    "openssh-client",
)

#: What only some suites have, added to :data:`PACKAGES` there (vhost-device-vsock is new in forky;
#: bookworm takes forky's, as `make setup` does on a Debian 12 host).
SUITE_PACKAGES: dict[str, tuple[str, ...]] = {"forky": ("vhost-device-vsock",), "bookworm": ("vhost-device-vsock",)}
#: A newer suite a tree also draws from, for what its own suite lacks (its own packages come first).
SUITE_BACKPORTS: dict[str, str] = {"bookworm": "forky"}
MIRROR = "http://deb.debian.org/debian"
#: What some suites lack, left out of :data:`PACKAGES` there (bookworm's virtiofsd is QEMU 7.2's own,
#: in qemu-system-common).
SUITE_LACKS: dict[str, tuple[str, ...]] = {"bookworm": ("virtiofsd",)}


def suite_packages(packages: Sequence[str], suite: str) -> list[str]:
    """``packages`` with what :data:`SUITE_PACKAGES` adds and :data:`SUITE_LACKS` removes for ``suite``."""
    return sorted((set(packages) | set(SUITE_PACKAGES.get(suite, ()))) - set(SUITE_LACKS.get(suite, ())))


#: apt/dpkg options for mmdebstrap: no docs, man pages or translations in the tree.
APT_OPTIONS: tuple[str, ...] = ('Acquire::Check-Valid-Until "false"',)
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)

#: Units masked in the tree: nothing to log in on, no network to wait for.
MASKED_UNITS: tuple[str, ...] = (
    "console-getty.service",
    "getty@.service",
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)

#: Where the host's build of the busybox test guest (vmspawnd.testing.guest) is bound read-only.
GUEST_INSIDE = "/var/cache/vmspawnd-test-guest"
#: And the extra initrd that puts the host's sshd into it (tests.sshd.guest_sshd_initrd).
SSHD_INSIDE = "/var/cache/vmspawnd-test-sshd"

VENV = "/opt/vmspawnd-venv"
SRC = "/src"
#: Marker written into a finished tree (inside it, so that a rename publishes tree and marker at once).
TREE_MARKER = "etc/vmspawnd-test-tree.json"
VENV_MARKER = ".vmspawnd-venv.json"

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_PREFIX = "vmspawnd-systemd-"
#: Files of the host that must look the same after a run (device nodes a container could chmod).
WATCHED_DEVICES: tuple[str, ...] = (
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx",
    "/dev/kvm", "/dev/net/tun", "/dev/fuse", "/dev/vhost-vsock",
)

#: Below these, the host's /run changes with other activity (VM tests' virtiofsd pid files, a
#: system-wide vmspawnd): the leak check looks at the directories themselves, not their content.
RUN_CHURN: tuple[str, ...] = ("/run/virtiofsd/", "/run/vmspawnd/", "/run/user/")

Log = Callable[[str], object]


def _stderr_log(msg: str) -> None:
    print(f"[systemd-harness] {msg}", file=sys.stderr, flush=True)


class HarnessError(RuntimeError):
    """Something the harness could not do; the message says what and why."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP arrived: unwind (tearing down) and exit with 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- paths and keys

def cache_root() -> Path:
    """``$VMSPAWND_CACHE`` or ``~/.cache/vmspawnd`` (shared with the test guest's cache)."""
    return Path(os.environ.get("VMSPAWND_CACHE") or Path.home() / ".cache" / "vmspawnd")


def repo_root() -> Path:
    """The project checkout this file belongs to (bound at :data:`SRC` inside)."""
    return Path(__file__).resolve().parents[2]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tree_inputs(packages: Sequence[str] = PACKAGES, suite: str = SUITE) -> dict:
    """Everything that decides the content of the tree."""
    return {
        "harness": HARNESS_VERSION,
        "suite": suite,
        "packages": suite_packages(packages, suite),
        **({"backports": SUITE_BACKPORTS[suite]} if suite in SUITE_BACKPORTS else {}),
        "apt": list(APT_OPTIONS),
        "dpkg": list(DPKG_OPTIONS),
        "masked": sorted(MASKED_UNITS),
    }


def tree_key(packages: Sequence[str] = PACKAGES, suite: str = SUITE) -> str:
    return f"{suite}-{_digest(tree_inputs(packages, suite))}"


def venv_inputs(repo: Path) -> dict:
    """What decides the venv: the project's metadata (dependencies, extras, entry points, version)."""
    init = (repo / "vmspawnd" / "__init__.py").read_text()
    version = re.search(r"^__version__\s*=\s*(.+)$", init, re.M)
    return {
        "harness": HARNESS_VERSION,
        "pyproject": hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest(),
        "version": version.group(1).strip() if version else None,
        "venv": VENV,
        "src": SRC,
    }


def venv_key(repo: Path) -> str:
    return _digest(venv_inputs(repo))


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """flock(2) on ``path``; builds take it exclusively, running containers shared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def clear_interrupted_builds(final: Path, log: Log = _stderr_log) -> None:
    """Remove temp trees of killed builds of ``final`` and a ``final`` without its ready marker
    (call with the build lock held)."""
    for old in final.parent.glob(f".tmp-{final.name}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log(f"removing the remains of an interrupted build: {old}")
            remove_tree(old)
    if os.path.lexists(final):  # a directory without marker: not ours to trust
        remove_tree(final)


def build_atomically(final: Path, ready: Callable[[Path], bool], make: Callable[[Path], None],
                     log: Log = _stderr_log) -> bool:
    """Build ``final`` once, under its lock: ``make(tmp)`` fills a temp dir that is then renamed into
    place (removed on any failure).  False if another process built it while we waited."""
    base = final.parent
    with file_lock(base / f"{final.name}.lock"):
        if ready(final):
            return False
        clear_interrupted_builds(final, log)
        tmp = base / f".tmp-{final.name}-{os.getpid()}"
        remove_tree(tmp)
        try:
            make(tmp)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                remove_tree(tmp)
            raise
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses to run while anything is mounted below ``path``."""
    if not os.path.lexists(path):
        return
    if busy := mounts_below(path):
        raise HarnessError(f"not removing {path}: still mounted there: {busy}")
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def run_child(argv: Sequence[str], *, stdout=None, grace: float = 30.0, **kw) -> int:
    """Run a build step in its own session; on any exception (Ctrl-C included) SIGTERM its whole
    process group, give it ``grace`` seconds to clean up, then SIGKILL it; never leave it running."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None, start_new_session=True, **kw)
    try:
        return proc.wait()
    except BaseException:
        with deferred_signals():
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
        raise


# --------------------------------------------------------------------------- host set-up

HOST_TOOLS = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap",
              "nsenter": "util-linux", "unshare": "util-linux"}


def ensure_host_tools(log: Log = _stderr_log) -> None:
    """apt-get install what is missing (as root), or say exactly what to install."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise HarnessError(f"missing host packages {missing}: "
                           f"install them as root (apt-get install {' '.join(missing)})")
    log(f"installing host packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600"]
    subprocess.run([*apt, "update", "-qq"], check=True, env=env)
    subprocess.run([*apt, "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def require_root() -> None:
    if os.geteuid() != 0:
        raise HarnessError("the systemd tier needs root (systemd-nspawn, mount namespaces, cgroups)")


# --------------------------------------------------------------------------- the tree

def tree_path(cache: Path | None = None, packages: Sequence[str] = PACKAGES, suite: str = SUITE) -> Path:
    return (cache or cache_root()) / "systemd-tree" / tree_key(packages, suite)


def tree_ready(tree: Path) -> bool:
    return (tree / TREE_MARKER).is_file() and (tree / "usr/lib/systemd/systemd").exists()


def mmdebstrap_argv(target: Path, packages: Sequence[str] = PACKAGES, suite: str = SUITE) -> list[str]:
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
            f"--include={','.join(suite_packages(packages, suite))}"]
    argv += [f"--aptopt={o}" for o in APT_OPTIONS]
    argv += [f"--dpkgopt={o}" for o in DPKG_OPTIONS]
    newer = SUITE_BACKPORTS.get(suite)
    if newer is None:
        return [*argv, suite, str(target)]
    return [*argv, f'--aptopt=APT::Default-Release "{suite}"', suite, str(target), f"deb {MIRROR} {suite} main",
            f"deb {MIRROR} {newer} main"]


def _finish_tree(root: Path, inputs: dict) -> None:
    """Post-processing done from the host (no chroot needed): masks, hostname, marker."""
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = unit_dir / unit
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to("/dev/null")
    # nspawn sets the hostname from --machine; machine-id stays "uninitialized" -> transient per boot
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / SRC.lstrip("/")).mkdir(exist_ok=True)
    (root / TREE_MARKER).write_text(json.dumps({**inputs, "built": time.time()}, indent=1) + "\n")


def build_tree(cache: Path | None = None, packages: Sequence[str] = PACKAGES, suite: str = SUITE,
               log: Log = _stderr_log) -> Path:
    """The cached tree for these inputs, built first (atomically: temp dir, then rename) if needed."""
    final = tree_path(cache, packages, suite)
    if tree_ready(final):
        return final
    require_root()

    def make(tmp: Path) -> None:
        log(f"building the {suite} tree with mmdebstrap ({len(packages)} packages) -> {final}")
        # in a private mount namespace: whatever mmdebstrap mounts dies with it, even on SIGKILL
        rc = run_child(["unshare", "--mount", "--propagation", "private", "--",
                        *mmdebstrap_argv(tmp, packages, suite)])
        if rc != 0:
            raise HarnessError(f"mmdebstrap failed (exit {rc})")
        _finish_tree(tmp, tree_inputs(packages, suite))

    t0 = time.monotonic()
    if build_atomically(final, tree_ready, make, log):
        log(f"tree built in {time.monotonic() - t0:.1f}s")
    return final


# --------------------------------------------------------------------------- the venv inside the tree

#: Copied from the checkout into a tmpfs at /src for the editable install (the build writes there).
_SRC_COPY = ("pyproject.toml", "README.md", "LICENSE", "vmspawnd")

_VENV_SCRIPT = r"""
set -eu
tree=$1 repo=$2 venv=$3 src=$4
mount -t proc proc "$tree/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$tree/dev"
# fresh nodes, never the host's: nothing in the chroot can chmod the host's /dev/null
mknod -m 666 "$tree/dev/null" c 1 3; mknod -m 666 "$tree/dev/zero" c 1 5; mknod -m 666 "$tree/dev/full" c 1 7
mknod -m 666 "$tree/dev/random" c 1 8; mknod -m 666 "$tree/dev/urandom" c 1 9; mknod -m 666 "$tree/dev/tty" c 5 0
ln -s /proc/self/fd "$tree/dev/fd"
mkdir "$tree/dev/shm" && mount -t tmpfs -o mode=1777 tmpfs "$tree/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$tree/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$tree$src"
shift 4
for f in "$@"; do [ -e "$repo/$f" ] && cp -a "$repo/$f" "$tree$src/"; done
find "$tree$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$tree$src"/*.egg-info
cat /etc/ssl/certs/ca-certificates.crt > "$tree/tmp/host-ca.crt" 2>/dev/null || :
[ -s "$tree/tmp/host-ca.crt" ] && cert=/tmp/host-ca.crt || cert=
cp -L /etc/resolv.conf "$tree/tmp/resolv.conf"
[ -e "$tree/etc/resolv.conf" ] || [ -L "$tree/etc/resolv.conf" ] || : > "$tree/etc/resolv.conf"
[ -L "$tree/etc/resolv.conf" ] && { rm "$tree/etc/resolv.conf"; : > "$tree/etc/resolv.conf"; }
mount --bind "$tree/tmp/resolv.conf" "$tree/etc/resolv.conf"
exec chroot "$tree" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 TMPDIR=/tmp PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
  PIP_CERT="$cert" PIP_DEFAULT_TIMEOUT=120 \
  sh -euc '
    python3 -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
    "$1/bin/pip" install -q -e "$2[test]"
    "$1/bin/python" -c "import vmspawnd, asyncvarlink, dbus_fast, systemd.daemon, systemd.journal, pytest"
  ' sh "$venv" "$src"
"""


def venv_ready(tree: Path, repo: Path) -> bool:
    marker = tree / VENV.lstrip("/") / VENV_MARKER
    try:
        return json.loads(marker.read_text()).get("key") == venv_key(repo)
    except (OSError, ValueError):
        return False


def build_venv(tree: Path, repo: Path, log: Log = _stderr_log) -> None:
    """``pip install -e /src[test]`` into :data:`VENV` inside the tree, unless it is up to date.

    Runs ``chroot`` in a private mount namespace where /proc, a mknod'ed /dev, /tmp and a writable
    copy of the project at /src are mounted just for the install; the editable install's finder
    maps ``vmspawnd`` to ``/src/vmspawnd``, which at run time is the live, read-only checkout.
    """
    if venv_ready(tree, repo):
        return
    require_root()
    with file_lock(tree.parent / f"{tree.name}.lock"):
        if venv_ready(tree, repo):
            return
        venv = tree / VENV.lstrip("/")
        remove_tree(venv)
        log(f"installing the project into {VENV} inside the tree (pip install -e {SRC}[test])")
        t0 = time.monotonic()
        pip_log = tree.parent / f"{tree.name}.venv.log"
        with open(pip_log, "wb") as out:
            try:
                rc = run_child(["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", _VENV_SCRIPT,
                                "bash", str(tree), str(repo), VENV, SRC, *_SRC_COPY], stdout=out)
            except BaseException:
                with contextlib.suppress(Exception):
                    remove_tree(venv)
                raise
        if rc != 0:
            with contextlib.suppress(Exception):
                remove_tree(venv)
            tail = "\n".join(pip_log.read_text(errors="replace").splitlines()[-30:])
            raise HarnessError(f"installing the project into the tree's venv failed (exit {rc}); "
                               f"{pip_log}:\n{tail}")
        (venv / VENV_MARKER).write_text(json.dumps({"key": venv_key(repo), **venv_inputs(repo)}, indent=1) + "\n")
        log(f"venv ready in {time.monotonic() - t0:.1f}s")


def prepare(cache: Path | None = None, repo: Path | None = None, log: Log = _stderr_log,
            suite: str = SUITE) -> Path:
    """Host tools, tree and venv, all cached: what a run needs before it boots."""
    repo = repo or repo_root()
    ensure_host_tools(log)  # cheap when all is there; the run needs nspawn even with a cached tree
    tree = build_tree(cache, suite=suite, log=log)
    build_venv(tree, repo, log=log)
    return tree


# --------------------------------------------------------------------------- cgroups

def cgroup_hierarchies() -> list[tuple[Path, str]]:
    """(mount point, our cgroup path in it) for the unified hierarchy and systemd's v1 one.

    On a hybrid host (like this one) both exist and nspawn looks at both; on a pure cgroup2
    host there is one. The container's cgroup is made below the cgroup we are in, never in or
    instead of someone else's.
    """
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        own["unified" if hid == "0" else controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, opts = fields[sep + 1], fields[sep + 3]
        point = Path(_unescape(fields[4]))
        if fstype == "cgroup2" and "unified" in own:
            found.append((point, own["unified"]))
        elif fstype == "cgroup" and "name=systemd" in opts.split(",") and "name=systemd" in own:
            found.append((point, own["name=systemd"]))
    return found


def cgroup_dirs(name: str) -> list[Path]:
    return [mount / rel.lstrip("/") / name for mount, rel in cgroup_hierarchies()]


def cgroup_pids(directory: Path) -> set[int]:
    pids: set[int] = set()
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def kill_cgroup(directory: Path) -> None:
    """SIGKILL everything in a cgroup subtree (cgroup.kill on cgroup2, else each pid)."""
    if not directory.is_dir():
        return
    killer = directory / "cgroup.kill"
    if killer.exists():
        with contextlib.suppress(OSError):
            killer.write_text("1")
            return
    for pid in cgroup_pids(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove_cgroup(directory: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup subtree, deepest first, retrying while the last processes are reaped."""
    deadline = time.monotonic() + timeout
    while directory.is_dir():
        dirs = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, directory]:
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()
        if not directory.is_dir():
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"cgroup {directory} still busy: pids {sorted(cgroup_pids(directory))}")
        time.sleep(0.05)


def stale_cgroups() -> list[Path]:
    """Our cgroups whose harness process is gone (a run that was SIGKILLed)."""
    stale = []
    for mount, rel in cgroup_hierarchies():
        base = mount / rel.lstrip("/")
        for d in base.glob(f"{CGROUP_PREFIX}*"):
            pid = d.name[len(CGROUP_PREFIX):]
            if pid.isdigit() and not _pid_alive(int(pid)):
                stale.append(d)
    return stale


def cleanup_stale(log: Log = _stderr_log) -> int:
    stale = stale_cgroups()
    for d in stale:
        log(f"removing the cgroup of a dead run: {d} (pids {sorted(cgroup_pids(d))})")
        kill_cgroup(d)
    for d in stale:
        remove_cgroup(d)
    return len(stale)


# --------------------------------------------------------------------------- the leak check

def _device_state(path: str) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_rdev)


def _mount_table() -> list[str]:
    """(mount point, fs type, source, options) of every mount of our namespace, ids stripped."""
    rows = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        sep = f.index("-")
        rows.append(f"{_unescape(f[4])} {f[sep + 1]} {f[sep + 2]} {f[5]}")
    return sorted(rows)


def _other_run(name: str) -> bool:
    """A cgroup of another, concurrent harness run (it checks its own); ours is never ignored."""
    return name.startswith(CGROUP_PREFIX) and name != f"{CGROUP_PREFIX}{os.getpid()}"


def _cgroup_tree() -> list[str]:
    entries = []
    for mount, _rel in cgroup_hierarchies():
        for d in mount.rglob("*"):
            if d.is_dir() and not any(_other_run(part) for part in d.relative_to(mount).parts):
                entries.append(f"{d}")
        entries.append(f"{mount}: subtree_control={_read(mount / 'cgroup.subtree_control')}")
    return sorted(entries)


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return "-"


@dataclass
class HostSnapshot:
    """What a run must not change on the host, taken before boot and after teardown."""

    mounts: list[str]
    cgroups: list[str]
    run_entries: list[str]
    devices: dict[str, tuple | None]

    @classmethod
    def take(cls) -> HostSnapshot:
        run = sorted(str(p) for p in Path("/run").rglob("*") if not str(p).startswith(RUN_CHURN)) \
            if Path("/run").is_dir() else []
        return cls(mounts=_mount_table(), cgroups=_cgroup_tree(), run_entries=run,
                   devices={d: _device_state(d) for d in WATCHED_DEVICES})

    def diff(self, after: HostSnapshot) -> list[str]:
        problems = []
        for what in ("mounts", "cgroups", "run_entries"):
            before_set, after_set = set(getattr(self, what)), set(getattr(after, what))
            problems += [f"{what}: new {x}" for x in sorted(after_set - before_set)]
            problems += [f"{what}: gone {x}" for x in sorted(before_set - after_set)]
        for dev, state in self.devices.items():
            if after.devices.get(dev) != state:
                problems.append(f"device {dev}: {state} -> {after.devices.get(dev)}")
        return problems


def processes_in_namespaces(namespaces: set[str]) -> list[int]:
    """PIDs of processes in any of the given namespaces (``mnt:[4026…]``/``pid:[…]`` links)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for ns in ("mnt", "pid"):
            try:
                if os.readlink(entry / "ns" / ns) in namespaces:
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found


# --------------------------------------------------------------------------- the container

#: Moves itself into the cgroups given before "--", then execs the rest.
_ENTER_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
#: Runs in the new private mount namespace: a tmpfs over /run (nspawn writes there), then nspawn.
_PRIVATE_RUN = 'mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run && exec "$@"'


@dataclass
class Container:
    """One booted container: ``with Container(tree) as c: c.run([...])``."""

    tree: Path
    repo: Path = field(default_factory=repo_root)
    name: str = field(default_factory=lambda: f"vmspawnd-test-{os.getpid()}")
    log: Log = _stderr_log
    log_dir: Path | None = None
    boot_timeout: float = 60.0
    stop_timeout: float = 30.0
    extra_nspawn_args: Sequence[str] = ()

    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    leader: int | None = field(default=None, init=False)
    cgroups: list[Path] = field(default_factory=list, init=False)
    namespaces: set[str] = field(default_factory=set, init=False)
    console_log: Path | None = field(default=None, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)

    # ---- argv

    def nspawn_argv(self) -> list[str]:
        return [
            "env", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1",
            "systemd-nspawn", "--quiet", f"--directory={self.tree}", f"--machine={self.name}",
            "--register=no", "--keep-unit", "--console=read-only", "--volatile=overlay",
            "--link-journal=no", "--resolv-conf=copy-host", "--timezone=off",
            f"--bind-ro={self.repo}:{SRC}",
            *self.extra_nspawn_args,
            "--boot",
        ]

    def boot_argv(self) -> list[str]:
        procs = [str(d / "cgroup.procs") for d in self.cgroups]
        return ["sh", "-c", _ENTER_CGROUPS, "sh", *procs, "--",
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", _PRIVATE_RUN, "sh", *self.nspawn_argv()]

    def nsenter_argv(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        if self.leader is None:
            raise HarnessError("the container is not running")
        environ = {"PATH": CONTAINER_PATH, "TERM": "dumb", "LANG": "C.UTF-8", **(env or {})}
        return ["nsenter", f"--target={self.leader}", "--all", "--root", "--wdns=/",
                "env", "-i", *(f"{k}={v}" for k, v in environ.items()), *argv]

    @staticmethod
    def systemd_run_argv(argv: Sequence[str], workdir: str = "/", env: dict[str, str] | None = None,
                         properties: Sequence[str] = ()) -> list[str]:
        out = ["systemd-run", "--quiet", "--pipe", "--wait", "--collect", "--service-type=exec",
               f"--property=WorkingDirectory={workdir}"]
        out += [f"--property={p}" for p in properties]
        out += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
        return [*out, *argv]

    # ---- life cycle

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        require_root()
        t0 = time.monotonic()
        log_dir = self.log_dir or cache_root() / "systemd-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in sorted(log_dir.glob("*.console.log"), key=lambda p: p.stat().st_mtime)[:-10]:
            old.unlink(missing_ok=True)
        self.console_log = log_dir / f"{self.name}.console.log"
        self.cgroups = cgroup_dirs(f"{CGROUP_PREFIX}{os.getpid()}")
        if not self.cgroups:
            raise HarnessError("no cgroup2 or name=systemd hierarchy mounted")
        for d in self.cgroups:
            d.mkdir()
        with open(self.console_log, "wb") as console:
            self.proc = subprocess.Popen(self.boot_argv(), stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = self._wait_for_leader()
        self._record_namespaces()
        self.timings["leader"] = time.monotonic() - t0
        state = self._wait_running()
        self.timings["running"] = time.monotonic() - t0
        self.log(f"container {self.name} is {state} after {self.timings['running']:.1f}s")

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def _wait_for_leader(self, timeout: float = 30.0) -> int:
        """The container's PID 1 (nspawn's child, in another pid namespace, running systemd)."""
        assert self.proc is not None
        my_pidns = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive():
                raise HarnessError(f"systemd-nspawn exited ({self.proc.returncode}) before the container "
                                   f"started:\n{self._console_tail()}")
            for child in children(self.proc.pid):
                try:
                    if (os.readlink(f"/proc/{child}/ns/pid") != my_pidns
                            and Path(f"/proc/{child}/comm").read_text().strip() == "systemd"):
                        return child
                except OSError:
                    continue
            time.sleep(0.02)
        raise HarnessError(f"no container init below systemd-nspawn after {timeout}s:\n{self._console_tail()}")

    def _record_namespaces(self) -> None:
        for pid, kinds in ((self.leader, ("pid", "mnt")), (self.proc.pid, ("mnt",))):
            for ns in kinds:
                with contextlib.suppress(OSError):
                    self.namespaces.add(os.readlink(f"/proc/{pid}/ns/{ns}"))
        self.namespaces.discard(os.readlink("/proc/self/ns/mnt"))
        self.namespaces.discard(os.readlink("/proc/self/ns/pid"))

    def _wait_running(self) -> str:
        deadline = time.monotonic() + self.boot_timeout
        state = "?"
        while time.monotonic() < deadline:
            if not self._alive():
                raise HarnessError(f"the container stopped while booting:\n{self._console_tail()}")
            p = subprocess.run(self.nsenter_argv(["systemctl", "is-system-running"]), capture_output=True,
                               text=True, stdin=subprocess.DEVNULL)
            state = p.stdout.strip() or state
            if state in ("running", "degraded"):
                return state
            time.sleep(0.1)
        jobs = self.run(["systemctl", "list-jobs", "--no-pager"], capture=True).stdout
        raise HarnessError(f"the container's systemd is still {state!r} after {self.boot_timeout}s; "
                           f"jobs:\n{jobs}\n{self._console_tail()}")

    def stop(self) -> None:
        """Orderly poweroff, SIGKILL what is left, remove our cgroups. Safe to call twice."""
        with deferred_signals():
            t0 = time.monotonic()
            if self._alive():
                assert self.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)  # nspawn: SIGRTMIN+3 to the container's init
                try:
                    self.proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.log(f"container {self.name} did not power off in {self.stop_timeout}s: killing it")
            for d in self.cgroups:
                if cgroup_pids(d):
                    kill_cgroup(d)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
            errors = []
            for d in self.cgroups:
                try:
                    remove_cgroup(d)
                except HarnessError as e:
                    errors.append(str(e))
            self.timings["stop"] = time.monotonic() - t0
            self.leader = None
            if errors:
                raise HarnessError("; ".join(errors))

    # ---- running things inside

    def exec(self, argv: Sequence[str], *, capture: bool = False, check: bool = False,
             env: dict[str, str] | None = None, timeout: float | None = None,
             stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """Run ``argv`` directly in the container's namespaces (not as a unit)."""
        return subprocess.run(self.nsenter_argv(argv, env), capture_output=capture, text=capture, check=check,
                              timeout=timeout, stdin=stdin)

    def run(self, argv: Sequence[str], *, workdir: str = "/", env: dict[str, str] | None = None,
            properties: Sequence[str] = (), capture: bool = False, check: bool = False,
            timeout: float | None = None, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """Run ``argv`` as a transient service of the container's systemd; its exit status is ours."""
        return self.exec(self.systemd_run_argv(argv, workdir, env, properties), capture=capture, check=check,
                         timeout=timeout, stdin=stdin)

    def run_checked(self, argv: Sequence[str]) -> str:
        p = self.exec(argv, capture=True)
        if p.returncode != 0:
            raise HarnessError(f"{shlex.join(argv)} failed inside ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def pytest(self, args: Sequence[str] = (), env: dict[str, str] | None = None) -> int:
        """``pytest -m systemd tests/systemd`` inside, output streamed; returns pytest's exit status."""
        env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "VMSPAWND_IN_TEST_CONTAINER": "1",
               "HOME": "/root", "VMSPAWND_CACHE": "/var/cache/vmspawnd", **(env or {})}
        argv = [f"{VENV}/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-m", "systemd",
                *(args or ["tests/systemd"])]
        return self.run(argv, workdir=SRC, env=env).returncode


def children(pid: int) -> list[int]:
    """The pids of process ``pid``'s children (spawned by any of its threads); none once it is gone.
    Read from ``/proc/<pid>/task/*/children``, or by each process's parent where the kernel has no
    such files (or a thread ended while they were read)."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except OSError:
        pass
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into :class:`Interrupted`, so that every path unwinds."""
    def raise_it(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, raise_it) for s in _HANDLED}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP during teardown (a second Ctrl-C must not leave things behind)."""
    pending: list[int] = []
    try:
        old = {s: signal.signal(s, lambda signum, _f: pending.append(signum)) for s in _HANDLED}
    except ValueError:  # not the main thread: nothing to defer
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            signal.raise_signal(pending[0])


# --------------------------------------------------------------------------- the test guest

def host_sshd_initrd(log: Log = _stderr_log) -> Path | None:
    """The directory of the extra initrd with the host's sshd for the test guest, built once."""
    directory = cache_root() / "guest-sshd"
    if (directory / "sshd.cpio").is_file():
        return directory
    try:
        from tests.sshd import guest_sshd_initrd

        with tempfile.TemporaryDirectory() as tmp:
            built = guest_sshd_initrd(Path(tmp))
            directory.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built), directory / "sshd.cpio")
    except Exception as e:  # noqa: BLE001 - any failure only means fewer tests inside
        log(f"no sshd for the test guest inside: {e}")
        return None
    return directory


def host_test_guest(log: Log = _stderr_log) -> Path | None:
    """The directory of the host's busybox test guest (vmlinuz + initrd.img), built if needed.

    It needs the project importable here (``make test-systemd`` runs the harness with the
    project's venv); without it, or if the build fails, the VM tests inside are skipped.
    """
    try:
        from vmspawnd.testing.guest import build_guest
    except ImportError as e:
        log(f"no test guest for the VM tests inside ({e})")
        return None
    try:
        guest = build_guest(log=lambda *a: None)
    except Exception as e:  # noqa: BLE001 - any failure only means fewer tests inside
        log(f"no test guest for the VM tests inside: building it failed: {e}")
        return None
    if guest.kernel.parent != guest.initrd.parent:
        return None
    return guest.kernel.parent


# --------------------------------------------------------------------------- one whole run

@dataclass
class RunResult:
    status: int
    timings: dict[str, float]
    leaks: list[str]


def run_in_container(action: Callable[[Container], int], *, cache: Path | None = None, repo: Path | None = None,
                     log: Log = _stderr_log, check_leaks: bool = True,
                     extra_nspawn_args: Sequence[str] = (), suite: str = SUITE) -> RunResult:
    """prepare -> snapshot -> boot -> action -> teardown -> snapshot again; the whole cycle."""
    require_root()
    repo = repo or repo_root()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    status = 1
    with interruptible():
        cleanup_stale(log)
        tree = prepare(cache, repo, log, suite)
        timings["prepare"] = time.monotonic() - t0
        before = HostSnapshot.take() if check_leaks else None
        container = Container(tree, repo, log=log, log_dir=(cache or cache_root()) / "systemd-logs",
                              extra_nspawn_args=extra_nspawn_args)
        try:
            with file_lock(tree.parent / f"{tree.name}.lock", exclusive=False), container:
                timings["boot"] = container.timings["running"]
                t1 = time.monotonic()
                status = action(container)
                timings["action"] = time.monotonic() - t1
        except Interrupted as e:
            log(f"interrupted by {signal.Signals(e.signum).name}: container torn down")
            status = 128 + e.signum
        timings["stop"] = container.timings.get("stop", 0.0)
        leaks: list[str] = []
        if before is not None:
            after = HostSnapshot.take()
            leaks = before.diff(after)
            leftovers = processes_in_namespaces(container.namespaces)
            leaks += [f"process {pid} still in the container's namespaces" for pid in leftovers]
            if container.proc is not None and _pid_alive(container.proc.pid) and container.proc.poll() is None:
                leaks.append(f"systemd-nspawn {container.proc.pid} still running")
        timings["total"] = time.monotonic() - t0
    return RunResult(status, timings, leaks)


def _report(result: RunResult, log: Log) -> int:
    log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    if result.leaks:
        log("LEAK CHECK FAILED: the host changed during the run:\n  " + "\n  ".join(result.leaks))
        return result.status or 1
    log("leak check: no mount, cgroup, process, /run entry or device node of the host changed")
    return result.status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.systemd.container", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, help="default: $VMSPAWND_CACHE or ~/.cache/vmspawnd")
    parser.add_argument("--no-leak-check", action="store_true")
    parser.add_argument("--bind-ro", action="append", default=[], metavar="HOST[:INSIDE]",
                        help="also bind this host path read-only into the container (repeatable)")
    parser.add_argument("--suite", choices=sorted(SUITES), default=SUITE,
                        help="the Debian suite of the tree: "
                             f"{', '.join(f'{k} (systemd {v})' for k, v in SUITES.items())} (default {SUITE})")
    parser.add_argument("--if-root", action="store_true",
                        help="when not root, say so and exit 0 instead of failing (for make test)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or verify) the cached tree and venv")
    t = sub.add_parser("test", help="run pytest -m systemd inside (default tests/systemd)")
    t.add_argument("--no-guest", action="store_true",
                   help="do not bind the host's test guest in (the VM tests inside are then skipped)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    r = sub.add_parser("run", help="run a command inside as a transient service")
    r.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("shell", help="an interactive shell inside (nsenter)")
    sub.add_parser("cleanup", help="remove cgroups left by killed runs")
    sub.add_parser("key", help="print the tree's cache path")
    args = parser.parse_args(argv)
    log = _stderr_log
    if args.if_root and os.geteuid() != 0 and args.cmd not in ("key",):
        log("SKIPPED: the systemd tier needs root (systemd-nspawn, mount namespaces, cgroups)")
        return 0
    try:
        if args.cmd == "key":
            print(tree_path(args.cache_dir, suite=args.suite))
            return 0
        if args.cmd == "cleanup":
            require_root()
            log(f"removed {cleanup_stale(log)} stale cgroup(s)")
            return 0
        if args.cmd == "build":
            t0 = time.monotonic()
            with interruptible():
                tree = prepare(args.cache_dir, log=log, suite=args.suite)
            log(f"tree ready at {tree} ({time.monotonic() - t0:.1f}s)")
            return 0
        binds = [f"--bind-ro={b}" for b in args.bind_ro]
        if args.cmd == "test":
            extra = [a for a in args.pytest_args if a != "--"]
            env = {}
            if not args.no_guest and (guest := host_test_guest(log)) is not None:
                binds.append(f"--bind-ro={guest}:{GUEST_INSIDE}")
                env["VMSPAWND_TEST_GUEST_DIR"] = GUEST_INSIDE
                if (sshd := host_sshd_initrd(log)) is not None:
                    binds.append(f"--bind-ro={sshd}:{SSHD_INSIDE}")
                    env["VMSPAWND_TEST_SSHD_INITRD"] = f"{SSHD_INSIDE}/sshd.cpio"
            if HOST_CA.is_file():  # pip inside (the `make install` test) trusts what the host trusts
                binds.append(f"--bind-ro={HOST_CA}:{CA_INSIDE}")
                env["PIP_CERT"] = CA_INSIDE
            action: Callable[[Container], int] = lambda c: c.pytest(extra, env)  # noqa: E731
        elif args.cmd == "run":
            command = [a for a in args.command if a != "--"] or ["true"]
            action = lambda c: c.run(command, workdir=SRC, stdin=None).returncode  # noqa: E731
        else:
            action = lambda c: c.exec(["bash", "-l"], stdin=None).returncode  # noqa: E731
        result = run_in_container(action, cache=args.cache_dir, log=log, check_leaks=not args.no_leak_check,
                                  extra_nspawn_args=binds, suite=args.suite)
        return _report(result, log)
    except Interrupted as e:
        log(f"interrupted by {signal.Signals(e.signum).name}")
        return 128 + e.signum
    except (HarnessError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
