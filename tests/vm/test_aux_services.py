# SPDX-License-Identifier: LGPL-2.1-or-later
"""swtpm and virtiofsd with real boots: TPM state across runs, shares, read-only enforcement, helper death."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

import pytest

from tests.conftest import VMSPAWN, assert_clean, process_gone, processes_mentioning, processes_using
from tests.polling import poll

pytestmark = pytest.mark.vm


def test_tpm_state_persists_across_boots_with_a_state_dir(vmspawn, tmp_path):
    state = tmp_path / "tpm-state"
    first = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpm1")
    assert first.wait() == 0, first.text
    assert "TPM present" in first.text
    assert "NV_DefineSpace rc=00000000" in first.text
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    assert_clean(first)  # no TPM state (and no swtpm) left in the runtime dir
    second = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpm2")
    assert second.wait() == 0, second.text
    assert "TPM NV index 0x01500001 EXISTS" in second.text


def test_a_tpm_state_another_vm_runs_with_is_named_as_in_use_not_damaged(vmspawn, tmp_path):
    """swtpm's lock of the state says "Could not initialize the TPM" too: moving the state away, as a
    damaged state's message says, would throw away the running VM's TPM."""
    state = tmp_path / "tpm-state"
    first = vmspawn("test.notify=1", "test.action=hang", f"--tpm-state={state}", name="tpmheld")
    poll(lambda: first.notify.lines(), lambda lines: "READY=1" in lines, 60)
    second = vmspawn("test.notify=1", f"--tpm-state={state}", name="tpmwants")
    assert second.wait() == 1, second.text
    assert f"tpm-state={state}: the TPM state is in use by another swtpm" in second.text, second.text
    assert "damaged" not in second.text and "TESTGUEST" not in second.text
    assert_clean(second)
    first.proc.terminate()  # (its guest ignores the power button: forced off)
    first.wait()
    assert (state / "tpm2-00.permall").stat().st_size > 0  # the state lives on, for its VM's next run


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only: it is mounted)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a tmpfs)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_a_tpm_whose_state_cannot_be_saved_is_refused_not_lost(vmspawn, small_fs):
    """A full file system would put the TPM in failure mode at the guest's first command, and the
    guest would find no TPM, with nothing said."""
    state = small_fs / "tpm"
    first = vmspawn("test.notify=1", "test.tpm=nv", "--tpm=yes", f"--tpm-state={state}", name="tpmfull1")
    assert first.wait() == 0 and "NV_DefineSpace rc=00000000" in first.text, first.text
    saved = {f.name: f.read_bytes() for f in state.iterdir()}
    with open(small_fs / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the file system fills up
            f.write(bytes(4096))

    refused = vmspawn("test.notify=1", "test.tpm=nv", "--tpm=yes", f"--tpm-state={state}", name="tpmfull2")
    assert refused.wait() == 1, refused.text
    assert f"tpm-state={state}: its file system has 0 KiB free" in refused.text, refused.text
    assert "TESTGUEST" not in refused.text  # no VM
    without = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmfull3")  # --tpm=auto
    assert without.wait() == 0, without.text
    assert "continuing without a TPM" in without.text and "its file system has 0 KiB free" in without.text
    assert "TPM ABSENT" in without.text
    assert {f.name: f.read_bytes() for f in state.iterdir()} == saved  # the TPM's state as it was

    (small_fs / "filler").unlink()
    again = vmspawn("test.notify=1", "test.tpm=nv", "--tpm=yes", f"--tpm-state={state}", name="tpmfull4")
    assert again.wait() == 0 and "TPM NV index 0x01500001 EXISTS" in again.text, again.text


def test_two_vms_started_at_once_on_one_new_tpm_state_manufacture_it_once(vmspawn, tmp_path):
    """Two swtpm_setup at once on one new state: the second waited forever for the first's lock (and
    vmspawn gave up after 30 s).  Now the starts take turns: one VM runs with the TPM, the other is
    told at once that the state is in use."""
    state = tmp_path / "tpm-state"
    runs = [vmspawn("test.notify=1", "test.action=hang", "test.tpm=nv", "--tpm=yes", f"--tpm-state={state}",
                    name=f"tpmrace{i}") for i in range(2)]
    ended = poll(lambda: [run for run in runs if run.proc.poll() is not None], bool, 60)
    assert len(ended) == 1, [run.text for run in runs]
    loser, = ended
    winner, = (run for run in runs if run is not loser)
    assert loser.wait() == 1
    assert f"tpm-state={state}: the TPM state is in use by another swtpm" in loser.text, loser.text
    assert winner.notify.wait_for("READY=1", 60), winner.text
    assert "NV_DefineSpace rc=00000000" in winner.text, winner.text  # a manufactured TPM, working
    winner.proc.terminate()
    winner.wait()


def test_a_tpm_state_directory_that_cannot_be_made_is_like_a_tpm_that_cannot_start(vmspawn, small_fs):
    """A new --tpm-state on a full file system (here: no inode left for its directory): --tpm=yes
    refuses with the path and why, --tpm=auto goes on without a TPM and says why (as for a swtpm that
    cannot start)."""
    subprocess.run(["mount", "-o", "remount,nr_inodes=1", str(small_fs)], check=True)  # (its root's only)
    state = small_fs / "tpm"
    refused = vmspawn("test.notify=1", "--tpm=yes", f"--tpm-state={state}", name="tpmnospc1")
    assert refused.wait() == 1, refused.text
    assert f"tpm-state={state}: cannot create the directory: No space left on device" in refused.text, refused.text
    assert "TESTGUEST" not in refused.text and "Traceback" not in refused.text
    without = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmnospc2")  # --tpm=auto
    assert without.wait() == 0, without.text
    assert "continuing without a TPM" in without.text and "No space left on device" in without.text, without.text
    assert "TPM ABSENT" in without.text


def test_a_damaged_tpm_state_is_named_with_what_swtpm_said_and_kept(vmspawn, tmp_path):
    """QEMU only says that its TPM command failed; vmspawn says which state, why, and what to do."""
    state = tmp_path / "tpm-state"
    first = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmbad1")
    assert first.wait() == 0 and "NV_DefineSpace rc=00000000" in first.text, first.text
    damaged = os.urandom(3000)
    (state / "tpm2-00.permall").write_bytes(damaged)

    refused = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmbad2")
    assert refused.wait() == 1, refused.text
    assert f"tpm-state={state}: swtpm cannot use the TPM state in it" in refused.text, refused.text
    assert "swtpm said: " in refused.text and "Could not initialize the TPM" in refused.text, refused.text
    assert refused.text.count("Could not initialize the TPM") == 1, refused.text  # said once, in the error
    assert "TESTGUEST" not in refused.text  # no VM
    assert (state / "tpm2-00.permall").read_bytes() == damaged  # nothing of it is lost
    assert_clean(refused)

    state.rename(tmp_path / "moved-away")  # as the message says: a new TPM
    again = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmbad3")
    assert again.wait() == 0 and "NV_DefineSpace rc=00000000" in again.text, again.text


def test_tpm_state_that_cannot_be_saved_while_the_vm_runs_is_reported(vmspawn, tmp_path):
    """The guest's first TPM command cannot be saved (the state dir made immutable once swtpm runs):
    its TPM is in failure mode from then on, and swtpm's log goes with the runtime dir; vmspawn says
    what swtpm logged."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chattr +i)")
    state = tmp_path / "tpm-state"
    first = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmro1")
    assert first.wait() == 0 and "NV_DefineSpace rc=00000000" in first.text, first.text

    run = vmspawn("test.notify=1", "test.tpm=nv", f"--tpm-state={state}", name="tpmro2")
    poll(lambda: (run.runtime_dir / "tpmro2" / "tpm.sock").exists(), bool, 30, 0.01)
    subprocess.run(["chattr", "+i", str(state)], check=True)
    try:
        assert run.wait() == 0, run.text
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=True)
    assert "auxiliary service logged errors" in run.text and "service=vmspawnd-tpmro2-tpm" in run.text, run.text
    assert "Entering failure mode" in run.text, run.text


def test_tpm_state_off_forgets_everything(vmspawn):
    for name in ("off1", "off2"):
        run = vmspawn("test.notify=1", "test.tpm=nv", "--tpm-state=off", name=name)
        assert run.wait() == 0, run.text
        assert "absent" in run.text and "EXISTS" not in run.text
        assert_clean(run)


def test_no_tpm_when_disabled(vmspawn):
    run = vmspawn("test.notify=1", "test.tpm=1", "--tpm=no", name="notpm")
    assert run.wait() == 0, run.text
    assert "TPM ABSENT" in run.text


def test_shares_read_write_and_read_only_enforced_on_the_host(vmspawn, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "hello.txt").write_text("hello-from-host\n")
    (ro / "data.txt").write_text("read-only-data\n")
    run = vmspawn("test.notify=1", f"--bind={rw}:/srv/rw", f"--bind-ro={ro}", "test.virtiofs=mnt0",
                  "test.virtiofs=mnt1", "test.cat=mnt0/hello.txt", "test.cat=mnt1/data.txt",
                  "test.write=mnt0/from-guest.txt", "test.forcewrite=mnt1/evil.txt", name="shares")
    assert run.wait() == 0, run.text
    assert "cat mnt0/hello.txt: hello-from-host" in run.text
    assert "cat mnt1/data.txt: read-only-data" in run.text
    assert (rw / "from-guest.txt").read_text().startswith("written-by-guest")
    assert "forcewrite mnt1/evil.txt FAILED" in run.text  # remounted rw in the guest, still refused
    assert sorted(p.name for p in ro.iterdir()) == ["data.txt"]
    assert_clean(run)


def test_directory_root_is_shared_with_tag_root(vmspawn, tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=vmspawnd-test\n")
    run = vmspawn("test.notify=1", f"--directory={tree}", "test.virtiofs=root", "test.cat=root/etc/os-release",
                  "test.cmdline=1", "--tpm=no", name="dirroot")
    assert run.wait() == 0, run.text
    assert "cat root/etc/os-release: ID=vmspawnd-test" in run.text
    assert "root=root rootfstype=virtiofs rw" in run.text


def test_a_directory_without_linux_boots_the_kernel_of_its_newest_boot_loader_entry(vmspawn, guest, tmp_path):
    """As systemd-vmspawn -D: the tree's own kernel and initrd, named by a loader entry in its /boot."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=vmspawnd-test\n")
    boot = tree / "boot"
    (boot / "loader" / "entries").mkdir(parents=True)
    shutil.copy(guest.kernel, boot / "vmlinuz-2.0")
    shutil.copy(guest.initrd, boot / "initrd.img-2.0")
    os.symlink("/boot/vmlinuz-2.0", boot / "vmlinuz")  # (absolute: the tree's /boot, not the host's)
    (boot / "vmlinuz-1.0").write_text("an older kernel that would not boot\n")
    (boot / "loader" / "entries" / "test-1.0.conf").write_text("version 1.0\nlinux /vmlinuz-1.0\n")
    (boot / "loader" / "entries" / "test-2.0.conf").write_text(
        "title test\nversion 2.0\nlinux /vmlinuz\ninitrd /initrd.img-2.0\n")
    run = vmspawn("test.notify=1", f"--directory={tree}", "test.virtiofs=root", "test.cat=root/etc/os-release",
                  "--tpm=no", name="dirboot", kernel=False)
    assert run.wait() == 0, run.text
    assert "cat root/etc/os-release: ID=vmspawnd-test" in run.text
    bare = vmspawn(f"--directory={tmp_path / 'tree' / 'etc'}", "--tpm=no", name="nokernel", kernel=False)
    assert bare.wait() == 1
    assert "no boot loader entry in its /efi or /boot" in bare.text and "Traceback" not in bare.text


def test_ephemeral_directory_runs_on_a_copy_and_never_touches_the_tree(vmspawn, tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("original\n")
    before = sorted((p.relative_to(tree), p.read_bytes() if p.is_file() else None) for p in tree.rglob("*"))
    run = vmspawn("test.notify=1", f"--directory={tree}", "--ephemeral", "test.virtiofs=root",
                  "test.cat=root/etc/hostname", "test.write=root/etc/hostname", "test.write=root/etc/new-file",
                  "test.action=hang", "--tpm=no", name="ephdir")
    assert run.notify.wait_for("READY=1", 60), run.text
    (copy,) = [p for p in tmp_path.iterdir() if p.name.startswith(".#tree.")]  # the copy the VM runs on
    poll(lambda: (copy / "etc" / "new-file").read_text() if (copy / "etc" / "new-file").exists() else "",
         lambda text: text == "written-by-guest\n")
    run.proc.send_signal(signal.SIGTERM)
    assert run.notify.wait_for("STOPPING=1", 30)
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    assert "cat root/etc/hostname: original" in run.text and "wrote root/etc/hostname" in run.text
    assert sorted((p.relative_to(tree), p.read_bytes() if p.is_file() else None) for p in tree.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".#")) == []  # the copy went with it
    assert_clean(run)


def test_a_signal_while_the_ephemeral_copy_is_made_ends_vmspawn_cleanly(vmspawn, tmp_path):
    """SIGTERM during the start-up (here: copying a tree, its ``cp`` held stopped so the copy never ends
    on its own): vmspawn ends at once, without a VM, a traceback, the ``cp`` or the copy."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20_000):
        (tree / f"f{i}").write_text("x")
    run = vmspawn("test.notify=1", f"--directory={tree}", "--ephemeral", "--tpm=no", name="ephsig")
    copy = poll(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".#tree.")], bool, 60, interval=0.01)[0]
    copying = poll(lambda: processes_mentioning(f"{copy}/"), bool, 60, interval=0.001)
    for pid in copying:
        os.kill(pid, signal.SIGSTOP)
    run.proc.terminate()
    assert run.wait(timeout=30) == 1, run.text  # (before, it waited for the copy to finish: forever here)
    assert "Traceback" not in run.text and "TESTGUEST" not in run.text, run.text
    assert all(process_gone(pid) for pid in copying)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".#")) == []
    assert_clean(run)


def test_the_copy_a_killed_run_left_is_removed_by_the_next_run(vmspawn, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    first = vmspawn("test.notify=1", f"--directory={tree}", "--ephemeral", "test.action=hang", "--tpm=no",
                    name="ephkill")
    assert first.notify.wait_for("READY=1", 60), first.text
    qemu = first.leader_pid()
    first.proc.kill()  # no clean-up of ours runs
    first.wait()
    poll(lambda: process_gone(qemu), bool, 30)  # QEMU follows its parent
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".#tree.")]) == 1  # left behind
    again = vmspawn("test.notify=1", f"--directory={tree}", "--ephemeral", "--tpm=no", name="ephkill",
                    env={"RUNTIME_DIRECTORY": str(first.runtime_dir)})
    assert again.wait() == 0, again.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".#")] == []  # the old copy and its own
    assert tree.is_dir()


@pytest.mark.parametrize("helper", ["swtpm", "virtiofsd"])
def test_a_dying_helper_stops_the_vm(vmspawn, tmp_path, helper):
    share = tmp_path / "share"
    share.mkdir()
    run = vmspawn("test.notify=1", "test.action=hang", f"--bind={share}", "test.virtiofs=mnt0", "--tpm=yes",
                  "--tpm-state=off", name=f"die-{helper}")
    assert run.notify.wait_for("READY=1", 60), run.notify.lines()
    def program_names(pid: int) -> set[str]:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        return {os.path.basename(a.decode(errors="replace")) for a in argv[:4]}

    victims = [p for p in processes_using(run.runtime_dir) if helper in program_names(p)]
    assert victims, f"no {helper} process found"
    qemu = run.leader_pid()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=30) == 1
    assert "exited unexpectedly" in run.text
    assert process_gone(qemu)
    assert_clean(run)


@pytest.mark.parametrize("bad", ["--bind={file}", "--bind=/nonexistent", "--bind={dir}:relative",
                                 "--bind-ro={file}:/x", "--tpm-state=relative/path"])
def test_bad_shares_fail_before_anything_starts(guest, tmp_path, bad):
    f = tmp_path / "file"
    f.write_text("x")
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    p = subprocess.run([*VMSPAWN, f"--linux={guest.kernel}", bad.format(file=f, dir=tmp_path)], capture_output=True,
                       text=True, env=env, timeout=30)
    assert p.returncode == 1 and "invalid" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert list((tmp_path / "run").iterdir()) == []
