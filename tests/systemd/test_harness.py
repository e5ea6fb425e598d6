# SPDX-License-Identifier: LGPL-2.1-or-later
"""Tests of the systemd tier's harness itself (tests/systemd/container.py), on the host.

The first group is pure logic and always runs. The second boots the container and checks that
every way out of a run -- success, failure inside, an exception, SIGINT/SIGTERM, a SIGKILLed
harness -- leaves the host as it was: no mount, cgroup, process, /run entry or device-node change.
It needs root and the cached tree, so it runs under ``make test-systemd`` (which sets
``VMSPAWND_SYSTEMD_HARNESS=1``) and is skipped in a plain ``pytest`` run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.systemd import container as h
from tests.systemd.helpers import why_no_systemd

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- logic (always)

#: What the brief for the tier requires in the tree.
REQUIRED_PACKAGES = {
    "systemd", "systemd-sysv", "dbus", "systemd-container", "python3", "python3-venv", "python3-dev", "gcc",
    "pkg-config", "libsystemd-dev", "qemu-system-x86", "qemu-utils", "swtpm", "swtpm-tools", "virtiofsd", "ovmf",
    "busybox-static", "procps",
}


def test_tree_has_the_required_packages() -> None:
    assert REQUIRED_PACKAGES <= set(h.PACKAGES)
    assert h.SUITE == "trixie"


def test_each_suite_gets_what_it_has(tmp_path: Path) -> None:
    """forky adds vhost-device-vsock, and bookworm takes forky's (as `make setup` does on Debian 12);
    bookworm has no virtiofsd package (QEMU 7.2 brings its own)."""
    assert "vhost-device-vsock" in h.suite_packages(h.PACKAGES, "forky")
    assert "vhost-device-vsock" not in h.suite_packages(h.PACKAGES, "trixie")
    bookworm = h.suite_packages(h.PACKAGES, "bookworm")
    assert "virtiofsd" not in bookworm and "qemu-system-x86" in bookworm
    assert set(bookworm) | {"virtiofsd"} == set(h.PACKAGES) | {"vhost-device-vsock"}
    argv = h.mmdebstrap_argv(tmp_path, suite="bookworm")
    assert argv[-4:] == ["bookworm", str(tmp_path), f"deb {h.MIRROR} bookworm main", f"deb {h.MIRROR} forky main"]
    assert '--aptopt=APT::Default-Release "bookworm"' in argv  # (forky only for what bookworm lacks)
    assert h.mmdebstrap_argv(tmp_path)[-2:] == ["trixie", str(tmp_path)]


def test_tree_key_is_stable_and_follows_its_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    key = h.tree_key()
    assert key == h.tree_key(tuple(reversed(h.PACKAGES)))  # order does not matter
    assert key.startswith("trixie-")
    assert h.tree_key((*h.PACKAGES, "strace")) != key
    assert h.tree_key(suite="forky") != key and h.tree_key(suite="bookworm") not in (key, h.tree_key(suite="forky"))
    monkeypatch.setattr(h, "HARNESS_VERSION", h.HARNESS_VERSION + "x")
    assert h.tree_key() != key


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMSPAWND_CACHE", str(tmp_path))
    assert h.tree_path() == tmp_path / "systemd-tree" / h.tree_key()
    monkeypatch.delenv("VMSPAWND_CACHE")
    assert h.tree_path() == Path.home() / ".cache/vmspawnd/systemd-tree" / h.tree_key()


def test_venv_key_follows_the_project_metadata(tmp_path: Path) -> None:
    (tmp_path / "vmspawnd").mkdir()
    (tmp_path / "vmspawnd/__init__.py").write_text('__version__ = "1.0"\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "vmspawnd"\ndependencies = []\n')
    key = h.venv_key(tmp_path)
    assert key == h.venv_key(tmp_path)
    (tmp_path / "vmspawnd/__init__.py").write_text('"""doc"""\n__version__ = "1.0"\n')
    assert h.venv_key(tmp_path) == key  # only the version counts, not the rest of the module
    (tmp_path / "vmspawnd/__init__.py").write_text('__version__ = "1.1"\n')
    assert h.venv_key(tmp_path) != key
    key = h.venv_key(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "vmspawnd"\ndependencies = ["x"]\n')
    assert h.venv_key(tmp_path) != key


def test_mmdebstrap_command() -> None:
    argv = h.mmdebstrap_argv(Path("/x/tree"))
    assert argv[0] == "mmdebstrap" and argv[-2:] == ["trixie", "/x/tree"]
    assert "--variant=minbase" in argv
    include = next(a for a in argv if a.startswith("--include="))
    assert set(include.split("=", 1)[1].split(",")) == set(h.PACKAGES)


def test_boot_command_is_the_safe_one() -> None:
    c = h.Container(Path("/cache/tree"), repo=Path("/work/repo"), name="t1")
    c.cgroups = [Path("/sys/fs/cgroup/unified/vmspawnd-systemd-1"), Path("/sys/fs/cgroup/systemd/vmspawnd-systemd-1")]
    argv = c.boot_argv()
    # 1. the booting shell moves itself into its own cgroups, 2. private mount namespace, 3. tmpfs /run
    assert argv[:3] == ["sh", "-c", h._ENTER_CGROUPS]
    assert argv[4:7] == [f"{d}/cgroup.procs" for d in c.cgroups] + ["--"]
    i = argv.index("unshare")
    assert argv[i:i + 5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert "mount -t tmpfs" in argv[i + 7] and " /run " in argv[i + 7]
    nspawn = argv[argv.index("systemd-nspawn"):]
    assert "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1" in argv
    for opt in ("--register=no", "--keep-unit", "--boot", "--directory=/cache/tree", "--bind-ro=/work/repo:/src",
                "--volatile=overlay"):
        assert opt in nspawn, opt
    # never a host device node (or anything else) bound writable
    assert not [a for a in nspawn if a.startswith("--bind=")]
    assert not [a for a in nspawn if "/dev" in a]


def test_commands_inside_go_through_nsenter_and_systemd_run() -> None:
    c = h.Container(Path("/t"), repo=REPO, name="t2")
    c.leader = 4242
    argv = c.nsenter_argv(c.systemd_run_argv(["true"], workdir="/src", env={"A": "b"}))
    assert argv[:5] == ["nsenter", "--target=4242", "--all", "--root", "--wdns=/"]
    assert argv[5:7] == ["env", "-i"]
    run = argv[argv.index("systemd-run"):]
    for opt in ("--pipe", "--wait", "--collect", "--property=WorkingDirectory=/src", "--setenv=A=b"):
        assert opt in run
    assert run[-1] == "true"


def test_snapshot_diff_names_every_change() -> None:
    a = h.HostSnapshot(mounts=["/ ext4 /dev/vda rw"], cgroups=["/sys/fs/cgroup/unified"], run_entries=["/run/lock"],
                       devices={"/dev/null": ("crw-rw-rw-", 0, 0, 259)})
    assert a.diff(a) == []
    b = h.HostSnapshot(mounts=[*a.mounts, "/run tmpfs tmpfs rw"], cgroups=[*a.cgroups, "/sys/fs/cgroup/unified/x"],
                       run_entries=[], devices={"/dev/null": ("crw-------", 0, 0, 259)})
    diff = a.diff(b)
    assert "mounts: new /run tmpfs tmpfs rw" in diff
    assert "cgroups: new /sys/fs/cgroup/unified/x" in diff
    assert "run_entries: gone /run/lock" in diff
    assert any(d.startswith("device /dev/null") for d in diff)


def test_other_runs_cgroups_are_not_ours_to_judge() -> None:
    assert h._other_run(f"{h.CGROUP_PREFIX}1")
    assert not h._other_run(f"{h.CGROUP_PREFIX}{os.getpid()}")
    assert not h._other_run("payload")


def test_cgroup_hierarchies_are_the_ones_nspawn_uses() -> None:
    kinds = set()
    for mount, rel in h.cgroup_hierarchies():
        assert mount.is_dir() and rel.startswith("/")
        kinds.add(mount.name)
    assert kinds, "no cgroup2 or name=systemd hierarchy found"


@pytest.mark.skipif(why_no_systemd() is None, reason="this host has a real systemd")
def test_systemd_tests_skip_with_a_reason_on_this_host() -> None:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/systemd/test_environment.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed" not in p.stdout.splitlines()[-1] and "skipped" in p.stdout.splitlines()[-1], p.stdout
    assert "needs a real systemd as PID 1" in p.stdout and "make test-systemd" in p.stdout


# ---------------------------------------------------------------- booting the container (make test-systemd)

needs_container = pytest.mark.skipif(
    os.environ.get("VMSPAWND_SYSTEMD_HARNESS") != "1" or os.geteuid() != 0,
    reason="boots the systemd container: run `make test-systemd` (sets VMSPAWND_SYSTEMD_HARNESS=1, needs root)")


def own_cgroups(pid: int) -> list[Path]:
    return [d for d in h.cgroup_dirs(f"{h.CGROUP_PREFIX}{pid}") if d.exists()]


@pytest.fixture(scope="module")
def tree() -> Path:
    return h.prepare(log=lambda m: None)


@pytest.fixture
def unchanged_host():
    """The host as before the test, checked independently of the harness's own check."""
    before = h.HostSnapshot.take()
    yield
    assert before.diff(h.HostSnapshot.take()) == []
    assert own_cgroups(os.getpid()) == []


@needs_container
def test_run_inside_state_and_exit_status(tree: Path, unchanged_host: None) -> None:
    seen: dict = {}

    def action(c: h.Container) -> int:
        seen["cgroups"] = [d for d in c.cgroups if d.is_dir()]
        seen["namespaces"] = set(c.namespaces)
        # leave things behind inside on purpose: a lingering service, files in /run
        c.exec(["systemd-run", "--quiet", "--unit=lingering", "sleep", "infinity"], check=True)
        c.exec(["sh", "-c", "echo x > /run/leftover"], check=True)
        # a booted systemd, and machined left alone as after a real boot (on 257 nothing has started it)
        assert c.run(["sh", "-c", "test -d /run/systemd/system && ! systemctl is-active --quiet systemd-machined"]
                     ).returncode == 0
        return c.run(["sh", "-c", "exit 7"]).returncode  # the exit status inside is the run's

    result = h.run_in_container(action, log=lambda m: None)
    assert result.status == 7 and result.leaks == [], result
    assert len(seen["cgroups"]) == len(h.cgroup_hierarchies()) and all(not d.exists() for d in seen["cgroups"])
    assert len(seen["namespaces"]) >= 2 and h.processes_in_namespaces(seen["namespaces"]) == []
    assert not Path("/run/leftover").exists()


@needs_container
def test_exception_tears_down(tree: Path, unchanged_host: None) -> None:
    box: dict = {}

    def action(c: h.Container) -> int:
        box["nspawn"], box["leader"] = c.proc.pid, c.leader
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        h.run_in_container(action, log=lambda m: None)
    for pid in (box["nspawn"], box["leader"]):
        assert not Path(f"/proc/{pid}").exists(), pid


def _start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.systemd.container", *args], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _command_name(pid: int) -> str | None:
    """The process's command name, or None once it has ended (the container's boot ends many)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _wait_booted(proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cgs = own_cgroups(proc.pid)
        if cgs and any(h.cgroup_pids(d) for d in cgs):
            # the container is up once the command (sleep) runs in it; poll through the leader
            pids = h.cgroup_pids(cgs[0])
            if any(_command_name(p) == "sleep" for p in pids):
                return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError("the container did not come up")


@needs_container
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_down(tree: Path, unchanged_host: None, sig: signal.Signals) -> None:
    proc = _start_cli("run", "--", "sleep", "600")
    try:
        _wait_booted(proc)
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out
    assert "interrupted by" in out and "leak check: no mount" in out, out
    assert own_cgroups(proc.pid) == []


@needs_container
def test_sigkilled_harness_is_cleaned_up_by_the_next_run(tree: Path, unchanged_host: None) -> None:
    proc = _start_cli("run", "--", "sleep", "600")
    _wait_booted(proc)
    proc.kill()  # no teardown at all: nspawn and the container keep running, in their cgroup
    proc.wait()
    left = own_cgroups(proc.pid)
    assert left and any(h.cgroup_pids(d) for d in left)
    assert h.cleanup_stale(log=lambda m: None) >= 1
    assert own_cgroups(proc.pid) == []
    proc.stdout.close()
