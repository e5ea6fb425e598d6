# SPDX-License-Identifier: LGPL-2.1-or-later
"""A machine's runtime dir is new for every run: a user whose VM ran under a name may keep a process
in that run's dir (writing files, planting symlinks) after it ended; the next run of that name, maybe
root's, must get a dir of its own, with nothing of theirs in it (``nobody`` plays the user)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import poll
from vmspawnd.guest.credentials import write_credentials
from vmspawnd.identity import ROOT, Identity
from vmspawnd.runtime import RuntimeDir

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (to act as another user)")

# Sits in the dir it is started in, in a subdir "smbios" of its own, and keeps planting there what
# a later run of root's would write (a symlink to root's file) and new files, as fast as it can.
RACER = """
import os, sys
os.mkdir("smbios"); os.chdir("smbios")
print("in", flush=True)
i = 0
while True:
    i += 1
    try:
        os.symlink(sys.argv[1], "secret.token")
    except OSError:
        pass
    try:
        os.mkdir(f"d{i}")
        open(f"d{i}/f", "w").close()
    except OSError:
        pass
"""


@pytest.fixture
def racer(public_dir: Path) -> Iterator[tuple[RuntimeDir, Path, subprocess.Popen]]:
    """A machine "web" whose run as ``nobody`` ended, its dir kept, with ``nobody``'s racer in it; and
    a file of root's (0600) that the racer's symlinks point to."""
    victim = public_dir / "victim"
    victim.write_text("root's data\n")
    victim.chmod(0o600)
    runtime = RuntimeDir(public_dir / "machines", "web")
    runtime.lock()
    rundir = runtime.renew(Identity.of_uid(NOBODY))
    assert os.stat(rundir).st_uid == NOBODY
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             "/usr/bin/python3", "-c", RACER, str(victim)],
                            cwd=rundir, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "in\n"
        runtime.unlock()  # the run ended (or its daemon was killed), and its dir was left behind
        yield runtime, victim, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_new_run_gets_a_new_dir_not_the_one_an_earlier_runs_user_still_writes_to(racer) -> None:
    runtime, victim, _ = racer
    runtime.lock()
    rundir = runtime.renew(ROOT)  # root's run of the same name, the racer still at work
    st = os.lstat(rundir)
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert list(rundir.iterdir()) == []
    files = write_credentials(rundir / "smbios", [("secret.token", b"TOPSECRET")])
    assert files.smbios == [rundir / "smbios" / "secret.token"]
    assert stat.S_ISREG(os.lstat(files.smbios[0]).st_mode)
    assert victim.read_text() == "root's data\n"
    # the old dir is gone (removed in the background): no hidden leftover the racer could go on filling
    poll(lambda: sorted(p.name for p in rundir.parent.iterdir()), lambda names: names == ["web", "web.run"], 10)
    runtime.remove()
    poll(lambda: list(rundir.parent.iterdir()), lambda entries: entries == [], 10)


def test_a_removed_runs_dir_is_gone_even_while_its_user_writes_to_it(racer) -> None:
    runtime, _, proc = racer
    runtime.lock()
    runtime.remove()  # e.g. the machine removed: its runtime dirs go with it
    assert not runtime.path.exists()  # (its name is free at once)
    poll(lambda: list(runtime.path.parent.iterdir()), lambda entries: entries == [], 10)
    assert proc.poll() is None  # (it was still at work, in a dir that is no more)


def test_removing_a_users_dir_never_opens_or_follows_what_they_put_in_it(public_dir: Path) -> None:
    outside = public_dir / "outside"  # what the user's entries point to: never touched
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "keep").write_text("kept")
    os.mkfifo(outside / "fifo")
    runtime = RuntimeDir(public_dir / "machines", "web")
    runtime.lock()
    rundir = runtime.renew(Identity.of_uid(NOBODY))
    nested = rundir / "a"
    for _ in range(100):  # deeper than a pass walks at once
        nested = nested / "a"
    nested.mkdir(parents=True)
    os.mkfifo(rundir / "fifo")  # opened, it would block the daemon
    os.mkfifo(nested / "fifo")
    (rundir / "to-dir").symlink_to(outside / "dir")
    (rundir / "a" / "to-fifo").symlink_to(outside / "fifo")
    (rundir / "to-null").symlink_to("/dev/null")
    runtime.remove()
    poll(lambda: list(runtime.path.parent.iterdir()), lambda entries: entries == [], 10)
    assert (outside / "dir" / "keep").read_text() == "kept" and stat.S_ISFIFO(os.stat(outside / "fifo").st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_dir_swapped_for_a_fifo_while_it_is_removed_is_not_opened(public_dir: Path, monkeypatch) -> None:
    # (the user's race: a dir when listed, a FIFO when opened, which would block an open() forever)
    runtime = RuntimeDir(public_dir / "machines", "web")
    runtime.lock()
    rundir = runtime.renew(Identity.of_uid(NOBODY))
    (rundir / "d").mkdir()
    listdir = os.listdir

    def swapping_listdir(path):  # the user's swap, between our listing and our open
        names = listdir(path)
        if "d" in names and isinstance(path, int):
            with contextlib.suppress(OSError):
                os.rmdir("d", dir_fd=path)
                os.mkfifo("d", dir_fd=path)
        return names

    monkeypatch.setattr(os, "listdir", swapping_listdir)
    runtime.remove()
    poll(lambda: list(runtime.path.parent.iterdir()), lambda entries: entries == [], 10)
