# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU argv building."""

import uuid
from pathlib import Path

import pytest

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.qemu.argv import (
    Resources,
    build_qemu_argv,
    check_cmdline_length,
    kernel_cmdline,
    qemu_extra_args,
    tap_mac,
)
from vmspawnd.values import ConsoleMode, ConsoleTransport, Network, Ram


def config(**kw) -> MachineConfig:
    return MachineConfig(name="vm1", linux=Path("/k/vmlinuz"), **kw)


def res(**kw) -> Resources:
    base = dict(qemu=Path("/usr/bin/qemu-system-x86_64"), kvm=False, qmp_fd=5, console_pty="/dev/pts/7",
                notify_args=("-chardev", "socket,id=notify,path=/run/x/notify.sock"),
                vmgenid=uuid.UUID(int=1))
    base.update(kw)
    return Resources(**base)


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_defaults_q35_one_cpu_2048m_tcg():
    argv = build_qemu_argv(config(), res())
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option(argv, "-machine") == ["type=q35,hpet=off"]
    assert option(argv, "-smp") == ["1"]
    assert option(argv, "-m") == ["2048M"]
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-nic") == ["none"]
    assert option(argv, "-kernel") == ["/k/vmlinuz"]
    assert option(argv, "-append") == ["console=hvc0"]


def test_kvm_and_sizes():
    argv = build_qemu_argv(config(ram=Ram(1 << 30), cpus="4"), res(kvm=True))
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-m") == ["1024M"]
    assert option(argv, "-smp") == ["4"]


def test_memory_hotplug():
    argv = build_qemu_argv(config(ram=Ram(1 << 30, 4 << 30, 2)), res())
    assert option(argv, "-m") == ["size=1024M,maxmem=4096M,slots=2"]


def test_user_words_follow_console_word_and_initrd_is_passed():
    argv = build_qemu_argv(config(kernel_cmdline=("quiet", "test.exit=7")), res(initrd=Path("/k/initrd")))
    assert option(argv, "-append") == ["console=hvc0 quiet test.exit=7"]
    assert option(argv, "-initrd") == ["/k/initrd"]


def test_term_is_propagated_to_a_console_on_a_terminal_device_only():
    c = config(kernel_cmdline=("quiet",))
    for mode in (ConsoleMode.INTERACTIVE, ConsoleMode.READ_ONLY, ConsoleMode.NATIVE):
        assert kernel_cmdline(c.replace(console=mode), "xterm-256color") == [
            "TERM=xterm-256color", "systemd.tty.term.hvc0=xterm-256color", "console=hvc0", "quiet"]
    assert kernel_cmdline(c.replace(console=ConsoleMode.HEADLESS), "xterm") == ["quiet"]
    assert kernel_cmdline(c, "bad term") == ["console=hvc0", "quiet"]


def test_a_graphical_console_keeps_the_guest_up_at_least_15_s():
    c = config(kernel_cmdline=("quiet",), console=ConsoleMode.GUI)
    assert kernel_cmdline(c, "xterm") == ["systemd.minimum_uptime_sec=15", "quiet"]


def test_console_modes():
    ro = build_qemu_argv(config(console=ConsoleMode.READ_ONLY), res())
    assert "serial,id=console,path=/dev/pts/7" in option(ro, "-chardev")
    assert "virtconsole,chardev=console" in option(ro, "-device")
    serial = build_qemu_argv(config(console=ConsoleMode.READ_ONLY, console_transport=ConsoleTransport.SERIAL), res())
    assert option(serial, "-serial") == ["chardev:console"]
    assert option(serial, "-append") == ["console=ttyS0"]
    headless = build_qemu_argv(config(console=ConsoleMode.HEADLESS), res(console_pty=None))
    assert "virtconsole,chardev=console" not in option(headless, "-device")
    assert "-append" not in headless
    gui = build_qemu_argv(config(console=ConsoleMode.GUI), res(console_pty=None))
    assert option(gui, "-vga") == ["virtio"] and "-nographic" not in gui
    assert "qemu-vdagent,id=vdagent,clipboard=on,debug=0" in option(gui, "-chardev")
    assert {"virtserialport,chardev=vdagent,name=org.qemu.guest_agent.0", "qemu-xhci,id=xhci0",
            "usb-kbd,bus=xhci0.0"} <= set(option(gui, "-device"))


def test_qmp_and_notify_channel_are_wired():
    argv = build_qemu_argv(config(), res())
    assert "socket,id=qmp,fd=5,server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "socket,id=notify,path=/run/x/notify.sock" in option(argv, "-chardev")


def test_qemu_11_gets_its_qmp_monitor_as_an_object_not_the_deprecated_mon():
    argv = build_qemu_argv(config(), res(qemu_version=(11, 1)))
    assert "-mon" not in argv and "monitor-qmp,id=qmp-monitor,chardev=qmp" in option(argv, "-object")
    assert option(build_qemu_argv(config(), res(qemu_version=(7, 2))), "-mon") == ["chardev=qmp,mode=control"]


def test_vsock_and_uuid_and_smbios():
    u = uuid.uuid4()
    argv = build_qemu_argv(config(uuid=u), res(vsock_cid=1234, vsock_fd=9, smbios_files=(Path("/r/a,b"),)))
    assert "vhost-vsock-pci,guest-cid=1234,vhostfd=9" in option(argv, "-device")
    assert option(argv, "-uuid") == [str(u)]
    assert option(argv, "-smbios") == ["type=11,path=/r/a,,b"]


def test_overlong_kernel_cmdline_is_refused_with_what_the_run_and_the_definition_add():
    near = config(kernel_cmdline=("x" * 2000,))  # the user's words fit…
    check_cmdline_length(near, None)
    with pytest.raises(ConfigError, match="limit"):
        check_cmdline_length(near, "xterm-256color")  # …not with TERM and the console's word
    with pytest.raises(ConfigError, match="limit"):  # …nor with what the run adds
        check_cmdline_length(near, None, (f"root=PARTUUID={uuid.uuid4()}",))
    from vmspawnd.options import parse_vmspawn_args
    from vmspawnd.settings import config_from_json

    fits_alone = "x" * 2040  # (with the console's word, 2053 bytes: a definition that could never start)
    with pytest.raises(ConfigError, match="kernel command line is 2053 bytes") as e:
        parse_vmspawn_args(["--linux=/k/vmlinuz", fits_alone])
    assert e.value.field == "cmdline"
    with pytest.raises(ConfigError) as e:
        config_from_json("vm1", {"linux": "/k/vmlinuz", "kernelCommandLine": [fits_alone], "console": "read-only"})
    assert e.value.field == "kernelCommandLine"
    assert config_from_json("vm1", {"linux": "/k/vmlinuz", "kernelCommandLine": [fits_alone]}  # (headless: no
                            ).kernel_cmdline == (fits_alone,)  # console word)


def test_daemon_console_is_a_socket_qemu_listens_on():
    argv = build_qemu_argv(config(console=ConsoleMode.READ_ONLY), res(console_pty=None, console_fd=7))
    assert "socket,id=console,fd=7,server=on,wait=off" in option(argv, "-chardev")
    assert "virtconsole,chardev=console" in option(argv, "-device")


def test_fixed_vsock_cid_is_the_only_candidate_and_a_taken_one_is_an_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    from vmspawnd.qemu import vsock

    tried = []

    def busy_ioctl(fd, request, arg):  # a vhost-vsock device on which every CID is taken
        tried.append(int.from_bytes(arg, "little"))
        raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(fcntl, "ioctl", busy_ioctl)
    device = tmp_path / "vhost-vsock"
    device.write_bytes(b"")
    from vmspawnd.config import ConfigError

    with pytest.raises(ConfigError, match="vsock-cid=4711: already taken"):
        vsock.claim_vsock("vm", str(device), fixed_cid=4711)
    assert tried == [4711]
    tried.clear()
    with pytest.raises(OSError, match="no free vsock CID"):
        vsock.claim_vsock("vm", str(device))
    assert len(tried) == 128 and tried[:64] == vsock.candidate_cids("vm")[:64]


def test_tap_mac_is_stable_unicast_local_and_overridable():
    mac = tap_mac("web", {})
    assert mac == tap_mac("web", {}) != tap_mac("db", {})
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert tap_mac("web", {"SYSTEMD_VMSPAWN_NETWORK_MAC": "52:54:00:AB:CD:EF"}) == "52:54:00:ab:cd:ef"
    with pytest.raises(ConfigError, match="SYSTEMD_VMSPAWN_NETWORK_MAC=52:54"):
        tap_mac("web", {"SYSTEMD_VMSPAWN_NETWORK_MAC": "52:54"})
    argv = build_qemu_argv(MachineConfig(name="web", linux=Path("/k/vmlinuz"), network=Network.TAP), res(mac=mac))
    assert option(argv, "-nic") == [f"tap,ifname=vt-web,script=no,downscript=no,model=virtio-net-pci,mac={mac}"]


def test_qemu_extra_words_are_split_like_a_shell_unescaped_and_appended_last():
    env = {"SYSTEMD_VMSPAWN_QEMU_EXTRA": "-device 'virtio-mouse-pci,id=m 1' -name a\\x2cb 'c\\x20d'"}
    assert qemu_extra_args(env) == ["-device", "virtio-mouse-pci,id=m 1", "-name", "a,b", "c d"]
    assert qemu_extra_args({}) == []
    argv = build_qemu_argv(config(), res(extra_args=("-S",)))
    assert argv[-1] == "-S"
    with pytest.raises(ConfigError, match="SYSTEMD_VMSPAWN_QEMU_EXTRA"):
        qemu_extra_args({"SYSTEMD_VMSPAWN_QEMU_EXTRA": "-name 'unbalanced"})
