# SPDX-License-Identifier: LGPL-2.1-or-later
"""Real boots of the test guest through ``vmspawn`` under TCG (or KVM where it works)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import VMSPAWN, assert_clean, process_gone
from tests.polling import poll
from tests.rawvarlink import call
from vmspawnd.testing.guest import GUEST_WORDS

pytestmark = pytest.mark.vm


def test_guest_ready_is_forwarded_to_our_manager(vmspawn):
    run = vmspawn("test.notify=1", "test.status=hello_from_guest", name="ready")
    assert run.wait() == 0, run.text
    lines = run.notify.lines()
    assert "STATUS=VM started." in lines
    assert run.leader_pid() is not None
    assert lines.index("READY=1") > lines.index("STATUS=VM started.")
    # the guest's STATUS= came with its READY=1: ours says it with READY=1, not "VM running." (the
    # lines of one datagram are recorded one after the other)
    assert lines[lines.index("READY=1") + 1] == "STATUS=VM running: hello from guest", lines
    assert "STATUS=VM running." not in lines
    assert "TESTGUEST" in run.text  # the guest's console reached our stdout
    assert_clean(run)


def test_a_guest_that_suspends_itself_is_told_to_our_manager_and_a_resume_wakes_it(vmspawn):
    """``systemctl status`` of a vmspawn service says the guest is suspended (ACPI S3), and says it runs
    again once woken (by machinectl resume: the control socket's Resume)."""
    run = vmspawn("test.notify=1", "test.action=suspend", name="sleepy")
    poll(run.notify.lines, lambda lines: "STATUS=VM suspended: the guest suspended itself to RAM." in lines, 60)
    control = run.runtime_dir / "sleepy.run" / "control"
    assert "error" not in call(control, "io.systemd.MachineInstance.Resume")
    lines = poll(run.notify.lines, lambda lines: "STATUS=VM running: woke up" in lines, 60)  # the guest's own word
    woken = lines.index("STATUS=VM suspended: the guest suspended itself to RAM.") + 1
    assert lines[woken] == "STATUS=VM running: test guest ready", lines  # (what it said before it slept)
    assert "error" not in call(control, "io.systemd.MachineInstance.Terminate")  # (woken, it may miss ACPI)
    assert run.wait() == 1, run.text
    assert_clean(run)


def test_guest_exit_status_becomes_ours(vmspawn):
    run = vmspawn("test.notify=1", "test.exit=7", name="exit7")
    assert run.wait() == 7, run.text
    assert_clean(run)


def test_without_a_terminal_the_console_is_read_only_by_default(vmspawn):
    """As from a script, cron or CI: stdin is /dev/null and stdout a pipe."""
    run = vmspawn("test.notify=1", "test.exit=3", name="noterm", console=None)
    assert run.wait() == 3, run.text
    assert "TESTGUEST" in run.output.decode(errors="replace")  # the guest's console, read-only
    assert "Traceback" not in run.text
    assert_clean(run)


def test_vmspawn_prints_only_its_banner_unless_asked_to_say_more(vmspawn):
    quiet = vmspawn("test.notify=1", name="hush")
    assert quiet.wait() == 0, quiet.text
    lines = [line for line in quiet.errors.decode(errors="replace").splitlines() if line.strip()]
    assert lines and all(line.startswith("░") for line in lines), lines  # no log lines at the default level
    loud = vmspawn("test.notify=1", "-v", name="loud")
    assert loud.wait() == 0, loud.text
    assert "vmspawn: firmware (machine=loud kind=bios" in loud.errors.decode(errors="replace")


def test_an_interactive_console_without_a_terminal_is_a_clear_error(vmspawn):
    run = vmspawn("test.notify=1", name="noterm2", console="interactive")
    assert run.wait() == 1
    assert "invalid console=interactive: needs a terminal" in run.text and "Traceback" not in run.text
    assert_clean(run)


def test_notify_ready_no_reports_ready_before_the_guest_is(vmspawn):
    run = vmspawn("test.notify=1", "test.delay=2", "test.status=late", "--notify-ready=no", name="early")
    assert run.wait() == 0, run.text
    times = {line: t for t, line in reversed(run.notify.messages)}
    assert times["READY=1"] < times["STATUS=VM running: late"] - 1.0
    assert run.notify.lines().count("READY=1") == 1


def test_a_guest_flooding_garbage_is_survived(vmspawn):
    run = vmspawn("test.notify=1", "test.garbage=1", "test.exit=3", name="garbage")
    assert run.wait(timeout=90) == 3, run.text
    assert "READY=1" in run.notify.lines()
    assert_clean(run)


def test_a_guest_that_never_gets_ready_is_not_reported_ready_and_sigterm_ends_it(vmspawn):
    run = vmspawn("test.notify=1", "test.ready=0", "test.action=hang", name="never")
    assert run.notify.wait_for("STATUS=VM started.", 30), run.notify.lines()
    poll(lambda: run.text, lambda text: "not sending READY=1" in text, 60)  # the guest is up, and hangs
    time.sleep(0.5)
    assert "READY=1" not in run.notify.lines()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=40) == 1, run.text  # it ignored the power button: forced off
    assert "the guest did not power off within 10 s; it was forced off" in run.text, run.text  # and said so
    assert "READY=1" not in run.notify.lines()
    assert_clean(run)


def test_sigterm_mid_boot_leaves_nothing_behind(vmspawn):
    run = vmspawn("test.notify=1", name="midboot")
    assert run.notify.wait_for("STATUS=VM started.", 30)
    pid = run.leader_pid()
    run.proc.send_signal(signal.SIGTERM)
    run.wait(timeout=40)
    assert run.proc.returncode in (0, 1)
    assert process_gone(pid)
    assert_clean(run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_powers_off_a_guest_that_listens_to_the_power_button(vmspawn, signum):
    """(SIGHUP, a terminal that went away, killed vmspawn, and with it its QEMU: the guest had no time
    to shut down.)"""
    run = vmspawn("test.notify=1", "test.action=acpi", "test.exit=5", name="acpi")
    assert run.notify.wait_for("READY=1", 60), run.notify.lines()
    run.proc.send_signal(signum)
    assert run.wait(timeout=30) == 5, run.text  # the guest powered off by itself and said so
    assert "power button pressed" in run.text or "exit status 5" in run.text
    assert_clean(run)


def test_second_sigint_forces_the_vm_off(vmspawn):
    run = vmspawn("test.notify=1", "test.action=hang", name="twice")
    assert run.notify.wait_for("READY=1", 60)
    run.proc.send_signal(signal.SIGINT)
    assert run.notify.wait_for("STOPPING=1", 30)  # the first one was handled: the second is not merged into it
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 1
    assert time.monotonic() - started < 8
    assert_clean(run)


def test_qemu_killed_by_a_signal_means_exit_1(vmspawn):
    run = vmspawn("test.notify=1", "test.action=hang", name="killed")
    assert run.notify.wait_for("READY=1", 60)
    os.kill(run.leader_pid(), signal.SIGKILL)
    assert run.wait(timeout=30) == 1
    assert "killed by signal" in run.text
    assert_clean(run)


def test_bad_options_fail_before_anything_is_spawned(guest, tmp_path):
    for bad in (["--ram=2G:1G"], ["--ram=2G::4"], ["--cpus=zero"], ["-M", "../x"], ["--console=tv"]):
        env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)}
        p = subprocess.run([*VMSPAWN, f"--linux={guest.kernel}", *bad], capture_output=True, env=env, timeout=30)
        assert p.returncode == 1, bad
        err = p.stderr.decode()
        assert "Traceback" not in err and "invalid" in err, err
        assert list(tmp_path.iterdir()) == []


def test_two_vms_with_the_same_name_cannot_run_at_once(vmspawn):
    first = vmspawn("test.notify=1", "test.action=hang", name="twin")
    assert first.notify.wait_for("READY=1", 60)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(first.runtime_dir)}
    second = subprocess.run([*VMSPAWN, *first.proc.args[len(VMSPAWN):]], capture_output=True, env=env, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert "already running" in second.stderr.decode()
    assert first.proc.poll() is None  # the first VM was not disturbed
    first.proc.send_signal(signal.SIGTERM)
    assert first.notify.wait_for("STOPPING=1", 30)  # handled: a second signal is not merged into the first
    first.proc.send_signal(signal.SIGTERM)
    first.wait()


def test_two_vms_with_long_names_alike_run_at_once_under_a_long_runtime_directory(vmspawn):
    """A 64-character name (the longest allowed) under a runtime base as long as pytest's: the VM's
    sockets would not fit a unix socket's path in ``<base>/<name>/``; two names differing only at their
    end still get a dir each."""
    names = ["a" * 63 + "1", "a" * 63 + "2"]
    first = vmspawn("test.notify=1", "test.action=acpi", "test.exit=5", name=names[0])
    assert first.notify.wait_for("READY=1", 90), first.text
    env = {**os.environ, "RUNTIME_DIRECTORY": str(first.runtime_dir)}
    argv = [*first.proc.args[:first.proc.args.index(names[0])], names[1], *GUEST_WORDS, "test.exit=4"]
    second = subprocess.run(argv, capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert second.returncode == 4, second.stderr.decode()
    assert first.proc.poll() is None  # the first VM was not disturbed
    assert len(os.fsencode(first.runtime_dir)) + len(names[0]) > 107 - len("/fs-mnt99.sock")
    [records] = first.runtime_dir.glob("*.run")  # the first's records dir: machinectl poweroff's way in
    assert "error" not in call(records / "control", "io.systemd.MachineInstance.PowerOff")
    assert first.wait(timeout=30) == 5, first.text
    assert_clean(first)


def test_a_runtime_directory_too_long_for_any_name_is_a_clear_error(guest, tmp_path):
    base = tmp_path / ("r" * (90 - len(os.fsencode(tmp_path)) - 1))
    base.mkdir()
    env = {**os.environ, "RUNTIME_DIRECTORY": str(base)}
    p = subprocess.run([*VMSPAWN, f"--linux={guest.kernel}", "-M", "web"], capture_output=True, env=env, timeout=30,
                       stdin=subprocess.DEVNULL, text=True)
    assert p.returncode == 1
    assert f"runtime-directory={base}: too long for the unix sockets" in p.stderr, p.stderr
    assert "(90 bytes; up to 74 fits any name)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and list(base.iterdir()) == []


def test_version_and_help():
    p = subprocess.run([*VMSPAWN, "--version"], capture_output=True, text=True, check=True)
    assert p.stdout.startswith("vmspawn ")
    h = subprocess.run([sys.executable, "-m", "vmspawnd.cli.vmspawn", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--notify-ready" in h.stdout


def test_credentials_reach_the_guest(vmspawn, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"from-a-file")
    big1, big2 = tmp_path / "big1", tmp_path / "big2"  # together too big for SMBIOS's 64 KiB
    big1.write_bytes(os.urandom(40_000))
    big2.write_bytes(os.urandom(40_000) + b"\0\n\0")
    run = vmspawn("test.notify=1", "test.cred=greeting", "test.cred=filecred", "test.cred=rawish",
                  "test.credsum=big1", "test.credsum=big2", "test.cred=ssh.ephemeral-authorized_keys-all", "test.net=1",
                  "--set-credential=greeting:hello\\x20world", f"--load-credential=filecred:{secret}",
                  f"--load-credential=big1:{big1}", f"--load-credential=big2:{big2}",
                  "--smbios11=io.systemd.credential:rawish=plain", "--vsock=no", "test.cred=fromenv", name="creds",
                  env={"SYSTEMD_VMSPAWN_QEMU_EXTRA": "-smbios 'type=11,value=io.systemd.credential:fromenv=a\\x20b'"})
    assert run.wait() == 0, run.text
    assert "cred greeting=hello world" in run.text
    assert "cred filecred=from-a-file" in run.text
    assert "cred rawish=plain" in run.text
    assert "cred fromenv=a b" in run.text  # $SYSTEMD_VMSPAWN_QEMU_EXTRA reached QEMU, quoted and C-unescaped
    assert "cred ssh.ephemeral-authorized_keys-all MISSING" in run.text  # no vsock: no SSH key by default
    assert "net: no network interface" in run.text  # no networking unless asked for
    assert f"credsum big1: {hashlib.md5(big1.read_bytes()).hexdigest()} (smbios)" in run.text, run.text
    assert f"credsum big2: {hashlib.md5(big2.read_bytes()).hexdigest()} (fw_cfg)" in run.text, run.text
    assert_clean(run)  # the credential files went with the runtime dir


def test_duplicate_credentials_are_refused(guest, tmp_path):
    p = subprocess.run([*VMSPAWN, f"--linux={guest.kernel}", "--set-credential=a:1", "--set-credential=a:2"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "twice" in p.stderr


def test_raw_image_with_extra_drive_and_root_partuuid(vmspawn, tmp_path):
    from tests.unit.test_disks import make_gpt
    from vmspawnd.qemu.disks import ROOT_X86_64

    root_uuid = uuid.uuid4()
    image, extra = tmp_path / "rootdisk.raw", tmp_path / "extra.raw"
    make_gpt(image, [(ROOT_X86_64, root_uuid)], size=8 << 20)
    extra.write_bytes(b"\0" * (4 << 20))
    run = vmspawn("test.notify=1", "test.disks=2", "test.cmdline=1", f"--image={image}",
                  f"--extra-drive={extra}", name="disks")
    assert run.wait() == 0, run.text
    assert f"root=PARTUUID={root_uuid}" in run.text
    assert "disk vda size=16384 serial=rootdisk.raw" in run.text
    assert "disk vdb size=8192 serial=extra.raw" in run.text
    assert_clean(run)


def test_uefi_boot_with_persistent_nvram(vmspawn, tmp_path):
    from tests.unit.test_disks import make_gpt
    from vmspawnd.qemu.disks import ROOT_X86_64

    image = tmp_path / "efi.raw"
    make_gpt(image, [(ROOT_X86_64, uuid.uuid4())], size=4 << 20)
    store = tmp_path / "efi.raw.efinvramstate"
    first = vmspawn("test.notify=1", f"--image={image}", "--efi-nvram-state=auto", name="uefi1", firmware="uefi")
    assert first.wait(timeout=120) == 0, first.text
    assert "READY=1" in first.notify.lines()
    assert store.is_file() and store.stat().st_mode & 0o777 == 0o600
    inode = store.stat().st_ino
    second = vmspawn("test.notify=1", f"--image={image}", "--efi-nvram-state=auto", "--secure-boot=no",
                     name="uefi2", firmware="uefi")
    assert second.wait(timeout=120) == 0, second.text
    assert store.stat().st_ino == inode  # reused, never replaced by a fresh copy of the template
    assert_clean(second)


def test_firmware_list_and_describe_agree_with_the_descriptors_on_disk():
    from vmspawnd.qemu.firmware import enumerate_descriptors

    listed = subprocess.run([*VMSPAWN, "--firmware=list"], capture_output=True, text=True, check=True).stdout.split()
    assert listed == [str(d.path) for d in enumerate_descriptors()]
    described = subprocess.run([*VMSPAWN, "--firmware=describe"], capture_output=True, text=True, check=True).stdout
    chosen = next(d for d in enumerate_descriptors() if "enrolled-keys" not in d.features)
    assert json.loads(described) == json.loads(chosen.path.read_text())
    no_sb = subprocess.run([*VMSPAWN, "--firmware=describe", "--secure-boot=no"], capture_output=True, text=True,
                           check=True).stdout
    assert "secure-boot" not in json.loads(no_sb)["features"]


def test_headless_console_shows_nothing_but_keeps_the_exit_status(vmspawn):
    run = vmspawn("test.notify=1", "test.exit=4", name="headless", console="headless")
    assert run.wait() == 4, run.text
    assert "TESTGUEST" not in run.output.decode(errors="replace")
    assert_clean(run)


def test_gui_console_boots_with_two_initrds(vmspawn, guest):
    run = vmspawn("test.notify=1", "test.exit=3", f"--initrd={guest.initrd}", name="gui", console="gui")
    assert run.wait() == 3, run.text  # the concatenated initrd (same archive twice) still boots
    assert "READY=1" in run.notify.lines()
    assert_clean(run)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_ephemeral_never_writes_the_image_and_plain_runs_do(vmspawn, tmp_path, fmt):
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "8M"], check=True)
    before = image.read_bytes()
    eph = vmspawn("test.notify=1", "test.diskwrite=vda", f"--image={image}", f"--image-format={fmt}", "-x",
                  "root=/dev/vda", name=f"eph-{fmt}")
    assert eph.wait() == 0, eph.text
    assert "diskwrite vda ok" in eph.text  # the guest did write…
    assert image.read_bytes() == before  # …to a throw-away snapshot
    plain = vmspawn("test.notify=1", "test.diskwrite=vda", f"--image={image}", f"--image-format={fmt}",
                    "root=/dev/vda", name=f"plain-{fmt}")
    assert plain.wait() == 0, plain.text
    data = image.read_bytes() if fmt == "raw" else subprocess.run(
        ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={image}", f"of={tmp_path / 'out.raw'}", "bs=512",
         "count=1"], check=True) and (tmp_path / "out.raw").read_bytes()
    assert b"vmspawnd-guest-was-here" in data


def test_uuid_and_serial_console_transport(vmspawn):
    u = uuid.uuid4()
    run = vmspawn("test.notify=1", "test.uuid=1", f"--uuid={u}", "--console-transport=serial", name="serialcon")
    assert run.wait() == 0, run.text
    assert f"uuid: {u}" in run.text  # printed on ttyS0, forwarded by us
    assert_clean(run)


def test_network_tap_without_cap_net_admin_is_a_clear_error(guest, tmp_path):
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)}
    p = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--", *VMSPAWN,
                        f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--firmware=bios", "-n",
                        "--console=headless", "-M", "tapless"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "CAP_NET_ADMIN" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_pass_ssh_key_lets_the_key_into_the_guest_and_takes_it_away(vmspawn):
    run = vmspawn("test.notify=1", "--pass-ssh-key=yes", "--ssh-key-type=ecdsa", "test.action=hang",
                  "test.cred=ssh.ephemeral-authorized_keys-all", "test.cred=systemd.unit-dropin.sshd-vsock@.service",
                  name="sshkey")
    assert run.notify.wait_for("READY=1", 60), run.text
    private = run.runtime_dir / "sshkey" / "ssh-ecdsa"
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    public = private.with_name("ssh-ecdsa.pub").read_text().strip()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    run.proc.send_signal(signal.SIGTERM)
    assert run.notify.wait_for("STOPPING=1", 30)
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    assert public.startswith("ecdsa-sha2-nistp256 ") and public.endswith(" vmspawnd@sshkey")
    assert f"cred ssh.ephemeral-authorized_keys-all={public}" in run.text
    assert "ImportCredential=ssh.ephemeral-authorized_keys-all" in run.text  # the sshd-vsock@ drop-in
    assert_clean(run)  # the key pair went with the runtime dir


def test_user_mode_networking_gives_the_guest_a_dhcp_lease(vmspawn):
    run = vmspawn("test.notify=1", "--network-user-mode", "test.net=1", name="usernet")
    assert run.wait() == 0, run.text
    assert "net: lease 10.0.2.15 router 10.0.2.2" in run.text, run.text  # QEMU's user-mode network answered


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this host: no TAP devices")
def test_network_tap_connects_the_guest_to_a_host_interface(vmspawn):
    tap = "vt-tapvm"  # the name upstream gives it: vt-<machine>
    run = vmspawn("test.notify=1", "-n", "test.ping=192.168.251.2/30,192.168.251.1", name="tapvm",
                  env={"SYSTEMD_VMSPAWN_NETWORK_MAC": "52:54:00:AB:CD:EF"})
    poll(lambda: subprocess.run(["ip", "link", "show", tap], capture_output=True).returncode, lambda rc: rc == 0, 60)
    subprocess.run(["ip", "addr", "add", "192.168.251.1/30", "dev", tap], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    assert run.wait() == 0, run.text
    assert "ping 192.168.251.1 answered" in run.text, run.text  # frames flow between the guest and the host
    assert "eth0 mac 52:54:00:ab:cd:ef" in run.text  # $SYSTEMD_VMSPAWN_NETWORK_MAC
    assert subprocess.run(["ip", "link", "show", tap], capture_output=True).returncode != 0  # gone with the VM
    assert_clean(run)


def test_a_cd_rom_root_is_mounted_read_only_and_never_grown(vmspawn, tmp_path):
    from tests.unit.test_disks import make_gpt
    from vmspawnd.qemu.disks import ROOT_X86_64

    image = tmp_path / "cd.raw"
    make_gpt(image, [(ROOT_X86_64, uuid.uuid4())], size=4 << 20)
    run = vmspawn("test.notify=1", "test.cmdline=1", f"--image={image}", "--image-disk-type=scsi-cd", "-G", "16M",
                  "--tpm=no", "rw", name="cdrom")
    assert run.wait() == 0, run.text
    cmdline = next(line for line in run.text.splitlines() if "cmdline:" in line).split()
    assert cmdline.index("ro") > cmdline.index("rw"), cmdline  # (the last one counts: the CD cannot be written)
    assert "--grow-image is ignored with --image-disk-type=scsi-cd" in run.text
    assert image.stat().st_size == 4 << 20
    assert_clean(run)


def test_machine_name_alone_boots_its_image_from_the_machine_pool(vmspawn, tmp_path):
    from tests.unit.test_disks import make_gpt
    from vmspawnd.qemu.disks import ROOT_X86_64

    pool = Path("/run/machines")  # in the pool's search path, and gone with the next boot
    made_pool = not pool.exists()
    pool.mkdir(exist_ok=True)
    name = f"pool{uuid.uuid4().hex[:8]}"
    root_uuid = uuid.uuid4()
    make_gpt(pool / f"{name}.raw", [(ROOT_X86_64, root_uuid)], size=4 << 20)
    try:
        run = vmspawn("test.notify=1", "test.disks=1", "test.cmdline=1", "--tpm-state=off", name=name)
        assert run.wait() == 0, run.text
        assert f"disk vda size=8192 serial={name}.raw" in run.text, run.text
        assert f"root=PARTUUID={root_uuid}" in run.text
    finally:
        (pool / f"{name}.raw").unlink()
        assert not (pool / f"{name}.raw.tpmstate").exists()  # --tpm-state=off: nothing kept beside it
        if made_pool:
            pool.rmdir()
