# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU's argv: a pure function of the MachineConfig and the resources resolved for it."""

from __future__ import annotations

import base64
import os
import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.guest.credentials import c_unescape
from vmspawnd.qemu import qemu_escape
from vmspawnd.qemu.disks import drive_args
from vmspawnd.values import ConsoleMode, ConsoleTransport, Network, check_kernel_cmdline, sha256

_TERM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\Z")


@dataclass(frozen=True)
class Resources:
    """What was set up for one run, and that the argv refers to."""

    qemu: Path
    kvm: bool
    qmp_fd: int
    qemu_version: tuple[int, int] = (0, 0)  # (major, minor): newer QEMUs deprecate options older ones need
    console_pty: str | None = None
    console_fd: int | None = None  # the daemon's restart-safe console: QEMU listens on this socket
    notify_args: tuple[str, ...] = ()
    vsock_cid: int | None = None
    vsock_fd: int | None = None
    smbios_files: tuple[Path, ...] = ()
    fw_cfg_files: tuple[tuple[str, Path], ...] = ()  # (name, file): credentials too big for SMBIOS
    initrd: Path | None = None
    vmgenid: uuid.UUID = field(default_factory=uuid.uuid4)
    term: str | None = None
    extra_cmdline: tuple[str, ...] = ()  # synthesized words (root=PARTUUID=…), after the user's
    firmware_args: tuple[str, ...] = ()
    smm: bool | None = None  # None: no UEFI firmware, leave smm alone
    aux_args: tuple[str, ...] = ()  # swtpm and virtiofs devices, shared memory
    uki: bool = False  # --linux is a UKI: its command line goes via SMBIOS, not -append
    mac: str | None = None  # the TAP link's guest MAC (default: derived from the name)
    extra_args: tuple[str, ...] = ()  # $SYSTEMD_VMSPAWN_QEMU_EXTRA, last


def console_word(config: MachineConfig) -> str | None:
    """The ``console=`` kernel word for the console mode and transport, if any."""
    if config.console in (ConsoleMode.GUI, ConsoleMode.HEADLESS):
        return None
    return "console=ttyS0" if config.console_transport is ConsoleTransport.SERIAL else "console=hvc0"


def kernel_cmdline(config: MachineConfig, term: str | None, extra: tuple[str, ...] = ()) -> list[str]:
    """Kernel command line words, in upstream's order: TERM and the console (for a console on a terminal
    device: not gui or headless), the user's words, synthesized ones."""
    words: list[str] = []
    cons = console_word(config)
    if cons and term and _TERM_RE.match(term):
        tty = "ttyS0" if config.console_transport is ConsoleTransport.SERIAL else "hvc0"
        words += [f"TERM={term}", f"systemd.tty.term.{tty}={term}"]
    if cons:
        words.append(cons)
    if config.console is ConsoleMode.GUI:
        words.append("systemd.minimum_uptime_sec=15")  # (as upstream does for a graphical console)
    words += config.kernel_cmdline
    words += extra
    return words


def tap_name(machine: str) -> str:
    """``vt-<machine>``, shortened with a hash suffix to fit the 15-character interface name limit."""
    name = f"vt-{machine}"
    if len(name) <= 15:
        return name
    digest = base64.urlsafe_b64encode(sha256(name)).decode()[:4]
    return name[:11] + digest


MAC_ENV = "SYSTEMD_VMSPAWN_NETWORK_MAC"
QEMU_EXTRA_ENV = "SYSTEMD_VMSPAWN_QEMU_EXTRA"
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


def tap_mac(machine: str, environ: Mapping[str, str] = os.environ) -> str:
    """The guest's MAC on its TAP link: $SYSTEMD_VMSPAWN_NETWORK_MAC, else derived from the machine
    name (stable across runs, so the guest keeps its DHCP lease; locally administered, unicast)."""
    given = environ.get(MAC_ENV)
    if given:
        if not _MAC_RE.match(given):
            raise ConfigError(MAC_ENV, given, "expected a MAC address such as 52:54:00:12:34:56")
        return given.lower()
    octets = bytearray(sha256(f"vmspawnd-tap/{machine}")[:6])
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def qemu_extra_args(environ: Mapping[str, str] = os.environ) -> list[str]:
    """$SYSTEMD_VMSPAWN_QEMU_EXTRA: shell-like words, C escapes undone, appended to QEMU's argv."""
    text = environ.get(QEMU_EXTRA_ENV, "")
    if not text:
        return []
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""  # backslashes are left for the C unescaping, quoted or not
    lexer.commenters = ""
    try:
        return [c_unescape(word, QEMU_EXTRA_ENV).decode(errors="surrogateescape") for word in lexer]
    except ValueError as e:  # unbalanced quotes (ConfigError, a ValueError too, passes through as is)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(QEMU_EXTRA_ENV, text, str(e)) from None


def network_args(config: MachineConfig, mac: str | None = None) -> list[str]:
    if config.network is Network.USER:
        return ["-nic", "user,model=virtio-net-pci"]
    if config.network is Network.TAP:
        return ["-nic", f"tap,ifname={tap_name(config.name)},script=no,downscript=no,model=virtio-net-pci,"
                        f"mac={mac or tap_mac(config.name, {})}"]
    return ["-nic", "none"]


def build_qemu_argv(config: MachineConfig, res: Resources) -> list[str]:
    """Build QEMU's complete argv (classic command-line form)."""
    machine = "type=q35" + ("" if res.smm is None else f",smm={'on' if res.smm else 'off'}") + ",hpet=off"
    argv = [str(res.qemu), "-machine", machine, "-smp", config.cpus]
    ram = config.ram
    if ram.max is not None:
        argv += ["-m", f"size={ram.size_mib}M,maxmem={ram.max_mib}M,slots={ram.slots or 1}"]
    else:
        argv += ["-m", f"{ram.size_mib}M"]
    argv += [
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0,id=rng-device0",
        "-device", "virtio-balloon,free-page-reporting=on",
        "-device", f"vmgenid,guid={res.vmgenid}",
        *network_args(config, res.mac),
        "-accel", "kvm" if res.kvm else "tcg",
        "-cpu", "max,hv_relaxed,hv-vapic,hv-time",
        "-no-user-config",
    ]
    if config.uuid is not None:
        argv += ["-uuid", str(config.uuid)]
    if res.vsock_cid is not None:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={res.vsock_cid},vhostfd={res.vsock_fd}"]
    argv += _console_args(config, res)
    argv += res.firmware_args
    argv += res.aux_args
    argv += ["-chardev", f"socket,id=qmp,fd={res.qmp_fd},server=on,wait=off"]
    # QEMU 11 deprecates -mon for -object monitor-qmp, which older QEMUs (7.2) do not have
    argv += ["-object", "monitor-qmp,id=qmp-monitor,chardev=qmp"] if res.qemu_version >= (11, 0) else \
        ["-mon", "chardev=qmp,mode=control"]
    argv += res.notify_args
    for path in res.smbios_files:
        argv += ["-smbios", f"type=11,path={qemu_escape(str(path))}"]
    for name, path in res.fw_cfg_files:
        argv += ["-fw_cfg", f"name={qemu_escape(name)},file={qemu_escape(str(path))}"]
    argv += drive_args(config.image, config.extra_drives, discard=config.discard_disk, ephemeral=config.ephemeral)
    if config.linux is not None:
        argv += ["-kernel", str(config.linux)]
        if res.initrd is not None:
            argv += ["-initrd", str(res.initrd)]
        cmdline = " ".join(kernel_cmdline(config, res.term, res.extra_cmdline))
        if cmdline and not res.uki:
            argv += ["-append", cmdline]
    return argv + list(res.extra_args)


def cmdline_smbios_strings(config: MachineConfig, term: str | None, extra: tuple[str, ...] = (),
                           uki: bool = False) -> list[str]:
    """Without --linux (or with a UKI) the command line reaches the boot loader / UKI stub via SMBIOS type 11."""
    cmdline = " ".join(kernel_cmdline(config, term, extra))
    if (config.linux is not None and not uki) or not cmdline:
        return []
    return [f"io.systemd.stub.kernel-cmdline-extra={cmdline}", f"io.systemd.boot.kernel-cmdline-extra={cmdline}"]


def _console_args(config: MachineConfig, res: Resources) -> list[str]:
    serial_bus = ["-device", "virtio-serial-pci,id=vmspawn-virtio-serial-pci"]
    mode = config.console
    if mode is ConsoleMode.GUI:  # with a clipboard shared through the guest's spice-vdagent, and a USB keyboard
        return ["-vga", "virtio", *serial_bus,
                "-chardev", "qemu-vdagent,id=vdagent,clipboard=on,debug=0",
                "-device", "virtserialport,chardev=vdagent,name=org.qemu.guest_agent.0",
                "-device", "qemu-xhci,id=xhci0", "-device", "usb-kbd,bus=xhci0.0"]
    args = ["-nographic", "-nodefaults", *serial_bus]
    if mode is ConsoleMode.HEADLESS:
        return args
    if mode is ConsoleMode.NATIVE:
        args += ["-chardev", "stdio,mux=on,id=console,signal=off", "-mon", "console"]
    elif res.console_fd is not None:
        args += ["-chardev", f"socket,id=console,fd={res.console_fd},server=on,wait=off"]
    else:
        assert res.console_pty is not None, "interactive/read-only consoles need a PTY"
        args += ["-chardev", f"serial,id=console,path={qemu_escape(res.console_pty)}"]
    if config.console_transport is ConsoleTransport.SERIAL:
        args += ["-serial", "chardev:console"]
    else:
        args += ["-device", "virtconsole,chardev=console"]
    return args


def check_cmdline_length(config: MachineConfig, term: str | None, extra: tuple[str, ...] = ()) -> None:
    """Refuse a kernel command line longer than the kernel accepts: the user's words with the console's,
    ``term``'s and ``extra`` (synthesized) words."""
    check_kernel_cmdline(kernel_cmdline(config, term, extra))
