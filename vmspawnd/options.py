# SPDX-License-Identifier: LGPL-2.1-or-later
"""The vmspawn option parser: argv → MachineConfig.

It lives once: ``vmspawn`` uses it directly and ``vmspawnctl create`` reuses it, so every
option means the same in both.  Errors raise :class:`ConfigError` (front ends exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from vmspawnd import __version__
from vmspawnd.config import (
    ConfigError,
    ConsoleMode,
    ConsoleTransport,
    DiskType,
    Drive,
    ImageFormat,
    MachineConfig,
    Network,
    Ram,
    Tristate,
    derive_machine_name,
    parse_bool,
    parse_enum,
    parse_private_users,
    parse_size,
    parse_state_setting,
    parse_tristate,
    validate_cpus,
)
from vmspawnd.guest.credentials import check_unique, parse_load_credential, parse_set_credential
from vmspawnd.images import find_machine_image
from vmspawnd.log import command_level
from vmspawnd.qemu.disks import parse_extra_drive
from vmspawnd.qemu.vsock import parse_vsock_cid
from vmspawnd.services.binduser import parse_bind_user_shell
from vmspawnd.services.virtiofsd import parse_bind
from vmspawnd.systemd.scope import DEFAULT_SLICE, mangle_slice
from vmspawnd.tint import validate_background


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ConfigError instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("arguments", "", message)


def _abspath(value: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(value)))


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Add every option that defines a machine (shared by vmspawn and vmspawnctl create)."""
    hidden = argparse.SUPPRESS
    img = parser.add_argument_group("Image and boot")
    img.add_argument("--linux", metavar="PATH", help="boot this kernel directly (-kernel)")
    img.add_argument("--initrd", metavar="PATH", action="append", default=[],
                     help="initrd for --linux; repeat to concatenate several")
    img.add_argument("-i", "--image", metavar="PATH", help="root disk image (regular file or block device)")
    img.add_argument("--image-format", metavar="FORMAT", help="raw (default) or qcow2")
    img.add_argument("--image-disk-type", metavar="TYPE",
                     help="virtio-blk (default), virtio-scsi, nvme or scsi-cd; extra drives inherit it")
    img.add_argument("--extra-drive", metavar="[FORMAT:][TYPE:]PATH", action="append", default=[],
                     help="attach another disk image")
    img.add_argument("--discard-disk", metavar="BOOL", help="let the guest's discard/TRIM reach the image (yes)")
    img.add_argument("-G", "--grow-image", metavar="BYTES", help="grow the image file to at least this size")
    img.add_argument("-x", "--ephemeral", action="store_true",
                     help="run on a throw-away snapshot; the image is never written")
    host = parser.add_argument_group("Host configuration")
    host.add_argument("--cpus", metavar="CPUS", help="number of virtual CPUs, or QEMU -smp syntax (default: 1)")
    host.add_argument("--qemu-smp", dest="cpus", help=hidden)
    host.add_argument("--ram", metavar="BYTES[:MAX[:SLOTS]]",
                      help="guest memory, K/M/G/T suffixes, rounded up to MiB (default: 2G)")
    host.add_argument("--qemu-mem", dest="ram", help=hidden)
    host.add_argument("--kvm", metavar="BOOL|auto",
                      help="use KVM (auto: only if /dev/kvm can run ordinary guests, else TCG)")
    host.add_argument("--qemu-kvm", dest="kvm", help=hidden)
    host.add_argument("--vsock", metavar="BOOL|auto",
                      help="give the guest a vsock device (auto: if /dev/vhost-vsock can be opened)")
    host.add_argument("--qemu-vsock", dest="vsock", help=hidden)
    host.add_argument("--vsock-cid", metavar="CID", help="the guest's vsock CID, 3…4294967294 (default: derived "
                      "from the machine name; taken = error)")
    host.add_argument("--firmware", metavar="auto|uefi|bios|none|PATH|list|describe",
                      help="firmware: auto (UEFI unless --linux is not a PE kernel), uefi, bios (QEMU's built-in), "
                           "none (direct kernel boot), a descriptor JSON; list/describe print and exit")
    host.add_argument("--firmware-features", metavar="FEATURE[,~FEATURE…]|list", action="append", default=[],
                      help="require (or with ~ exclude) descriptor features; default excludes enrolled-keys; "
                           "'list' prints all features")
    host.add_argument("--secure-boot", metavar="BOOL|auto", dest="firmware_features", action=SecureBootAction,
                      help="require (yes) or exclude (no) Secure Boot firmware")
    host.add_argument("--efi-nvram-template", metavar="PATH", help="UEFI variable store template to start from")
    host.add_argument("--efi-nvram-state", metavar="PATH|auto|off",
                      help="where UEFI variables persist (auto: <image>.efinvramstate; off: discarded)")
    host.add_argument("--tpm", metavar="BOOL|auto", help="give the VM a TPM via swtpm (auto: if swtpm is installed)")
    host.add_argument("--tpm-state", metavar="PATH|auto|off",
                      help="where TPM state persists (auto: <image-or-directory>.tpmstate; off: discarded)")
    mounts = parser.add_argument_group("Mounts")
    mounts.add_argument("-D", "--directory", metavar="PATH", help="boot this directory tree as root fs (virtiofs)")
    mounts.add_argument("--private-users", metavar="UIDBASE[:NUIDS]",
                        help="with --directory: guest UIDs 0… map to host UIDBASE… (needs the Rust virtiofsd)")
    mounts.add_argument("--bind", metavar="SRC[:DST]", action="append", default=[],
                        help="share a host directory with the guest (virtiofs, tag mnt0, mnt1, …)")
    mounts.add_argument("--bind-ro", metavar="SRC[:DST]", action="append", default=[],
                        help="share a host directory read-only (enforced on the host)")
    mounts.add_argument("--bind-user", metavar="NAME", action="append", default=[],
                        help="make a host user and their home (at /run/vmhost/home/NAME) available in the VM "
                             "(needs the Rust virtiofsd and a guest with systemd's userdb)")
    mounts.add_argument("--bind-user-shell", metavar="BOOL|PATH",
                        help="give --bind-user users a login shell: the host's (yes), none (no, default) or PATH")
    mounts.add_argument("--bind-user-group", metavar="GROUP", action="append", default=[],
                        help="add --bind-user users to this extra group in the VM")
    integ = parser.add_argument_group("Integration")
    integ.add_argument("--pass-ssh-key", metavar="BOOL|auto",
                       help="make an ephemeral SSH key pair and let it into the guest's sshd-vsock@.service "
                            "(auto, the default: when the guest has vsock)")
    integ.add_argument("--ssh-key-type", metavar="TYPE", help="ed25519 (default), ecdsa or rsa")
    integ.add_argument("--forward-journal", metavar="FILE|DIR",
                       help="receive the guest's journal (over vsock, with systemd-journal-remote) into a "
                            "*.journal file or a directory")
    integ.add_argument("--forward-journal-max-use", metavar="BYTES", help="journal-remote's --max-use=")
    integ.add_argument("--forward-journal-keep-free", metavar="BYTES", help="journal-remote's --keep-free=")
    integ.add_argument("--forward-journal-max-file-size", metavar="BYTES",
                       help="journal-remote's --max-file-size=")
    integ.add_argument("--forward-journal-max-files", metavar="N", help="journal-remote's --max-files=")
    props = parser.add_argument_group("Properties")
    props.add_argument("-S", "--slice", metavar="SLICE", help="slice for the VM's scope (default: machine.slice)")
    props.add_argument("--property", metavar="NAME=VALUE", action="append", default=[],
                       help="set a property on the VM's scope (systemctl set-property syntax: MemoryMax=, "
                            "CPUQuota=, TasksMax=, IOWeight=, DeviceAllow=, …)")
    props.add_argument("--register", metavar="BOOL|auto",
                       help="register the VM with systemd-machined (auto: if machined is running)")
    props.add_argument("--keep-unit", action="store_true",
                       help="do not create a scope: QEMU stays in the caller's unit")
    net = parser.add_argument_group("Networking")
    net.add_argument("-n", "--network-tap", dest="network", action="store_const", const="tap",
                     help="TAP networking (interface vt-NAME; needs CAP_NET_ADMIN)")
    net.add_argument("--network-user-mode", dest="network", action="store_const", const="user",
                     help="QEMU's user-mode networking")
    ident = parser.add_argument_group("System identity")
    ident.add_argument("-M", "--machine", metavar="NAME",
                       help="machine name (default: from the image, directory or kernel file name; "
                            "with -x plus a random suffix)")
    ident.add_argument("--uuid", metavar="UUID", help="the machine's UUID (SMBIOS system UUID)")
    exe = parser.add_argument_group("Execution")
    exe.add_argument("--notify-ready", metavar="BOOL",
                     help="report READY=1 only once the guest did (default: yes)")
    creds = parser.add_argument_group("Credentials")
    creds.add_argument("--set-credential", metavar="ID:VALUE", action="append", default=[],
                       help="pass a credential to the guest (C escapes allowed)")
    creds.add_argument("--load-credential", metavar="ID:PATH", action="append", default=[],
                       help="pass a credential read from a file or AF_UNIX socket")
    creds.add_argument("-s", "--smbios11", metavar="STRING", action="append", default=[],
                       help="pass a raw SMBIOS type 11 string (empty clears the list)")
    io = parser.add_argument_group("Input/output")
    io.add_argument("--console", metavar="MODE",
                    help="interactive, read-only, native, gui or headless (default: interactive on a "
                         "terminal, else read-only)")
    io.add_argument("--console-transport", metavar="TRANSPORT",
                    help="virtio (hvc0, default) or serial (ttyS0) console device in the guest")
    io.add_argument("--qemu-gui", dest="console", action="store_const", const="gui", help=hidden)
    parser.add_argument("cmdline", nargs="*", default=[], metavar="KERNEL-CMDLINE",
                        help="extra words for the guest's kernel command line")


def config_from_args(ns: argparse.Namespace) -> MachineConfig:
    """Turn parsed options into a validated MachineConfig."""
    if ns.machine and not ns.image and not ns.directory:
        _from_machine_pool(ns)
    linux = _abspath(ns.linux) if ns.linux else None
    image = _image(ns)
    if ns.machine is not None:
        name = ns.machine
    elif image is not None or ns.directory or linux is not None:
        name = derive_machine_name(image.path if image is not None else _abspath(ns.directory) if ns.directory
                                   else linux)
        if ns.ephemeral:
            name = f"{name[:47]}-{secrets.token_hex(8)}"
    else:
        raise ConfigError("machine", "", "pass -M/--machine=NAME, --image=IMAGE or --linux=KERNEL")
    try:
        machine_uuid = uuid.UUID(ns.uuid) if ns.uuid else None
    except ValueError:
        raise ConfigError("uuid", ns.uuid, "not a valid UUID") from None
    config = MachineConfig(
        name=name,
        linux=linux,
        initrds=tuple(_abspath(p) for p in ns.initrd),
        kernel_cmdline=tuple(ns.cmdline),
        ram=Ram.parse(ns.ram) if ns.ram is not None else Ram(),
        cpus=validate_cpus(ns.cpus) if ns.cpus is not None else "1",
        kvm=parse_tristate("kvm", ns.kvm) if ns.kvm is not None else Tristate.AUTO,
        vsock=parse_tristate("vsock", ns.vsock) if ns.vsock is not None else Tristate.AUTO,
        vsock_cid=parse_vsock_cid(ns.vsock_cid),
        notify_ready=parse_bool("notify-ready", ns.notify_ready) if ns.notify_ready is not None else True,
        console=parse_enum("console", ns.console, ConsoleMode) if ns.console else ConsoleMode.INTERACTIVE,
        console_transport=(parse_enum("console-transport", ns.console_transport, ConsoleTransport)
                           if ns.console_transport else ConsoleTransport.VIRTIO),
        uuid=machine_uuid,
        credentials=_credentials(ns),
        smbios11=_smbios11(ns.smbios11),
        image=image,
        extra_drives=tuple(parse_extra_drive(v, image.disk_type if image else DiskType.VIRTIO_BLK)
                           for v in ns.extra_drive),
        discard_disk=parse_bool("discard-disk", ns.discard_disk) if ns.discard_disk is not None else True,
        grow_image=parse_size("grow-image", ns.grow_image) if ns.grow_image else 0,
        ephemeral=ns.ephemeral,
        network=Network(ns.network) if ns.network else Network.NONE,
        firmware=_firmware_value(ns.firmware),
        firmware_features=tuple(ns.firmware_features),
        efi_nvram_template=_abspath(ns.efi_nvram_template) if ns.efi_nvram_template else None,
        efi_nvram_state=parse_state_setting(ns.efi_nvram_state, "efi-nvram-state"),
        tpm=parse_tristate("tpm", ns.tpm) if ns.tpm is not None else Tristate.AUTO,
        tpm_state=parse_state_setting(ns.tpm_state, "tpm-state"),
        directory=_abspath(ns.directory) if ns.directory else None,
        binds=tuple([parse_bind(v, False) for v in ns.bind] + [parse_bind(v, True) for v in ns.bind_ro]),
        private_users=parse_private_users(ns.private_users) if ns.private_users else None,
        bind_users=tuple(ns.bind_user),
        bind_user_shell=parse_bind_user_shell(ns.bind_user_shell) if ns.bind_user_shell is not None else "no",
        bind_user_groups=tuple(ns.bind_user_group),
        pass_ssh_key=parse_tristate("pass-ssh-key", ns.pass_ssh_key) if ns.pass_ssh_key is not None else Tristate.AUTO,
        ssh_key_type=ns.ssh_key_type if ns.ssh_key_type is not None else "ed25519",
        forward_journal=_abspath(ns.forward_journal) if ns.forward_journal else None,
        forward_journal_max_use=_optional_size("forward-journal-max-use", ns.forward_journal_max_use),
        forward_journal_keep_free=_optional_size("forward-journal-keep-free", ns.forward_journal_keep_free),
        forward_journal_max_file_size=_optional_size("forward-journal-max-file-size",
                                                     ns.forward_journal_max_file_size),
        forward_journal_max_files=_file_count(ns.forward_journal_max_files),
        register=parse_tristate("register", ns.register) if ns.register is not None else Tristate.AUTO,
        slice=mangle_slice(ns.slice) if ns.slice else DEFAULT_SLICE,
        properties=tuple(ns.property),
        keep_unit=ns.keep_unit,
        quiet=getattr(ns, "quiet", False),
    )
    return config.validated()


def _from_machine_pool(ns: argparse.Namespace) -> None:
    """-M NAME alone: boot NAME's image or directory from the machine pool (/var/lib/machines, …)."""
    found = find_machine_image(ns.machine)
    if found is None:
        return  # --linux alone may still boot; if not, validation says what is missing
    kind, path = found
    if kind == "image":
        ns.image = str(path)
    else:
        ns.directory = str(path)


def _optional_size(field: str, value: str | None) -> int | None:
    return parse_size(field, value) if value is not None else None


def _file_count(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError("forward-journal-max-files", value, "expected a positive number")
    return int(value)


def _firmware_value(value: str | None) -> str:
    if not value:
        return "auto"
    if value.startswith("./") or value.startswith("/"):
        return os.path.abspath(value)
    return value


class SecureBootAction(argparse.Action):
    """--secure-boot=X joins the ordered --firmware-features list, so the two combine in order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from vmspawnd.qemu.firmware import secure_boot_token

        items = list(getattr(namespace, self.dest, None) or [])
        items.append(secure_boot_token(str(values)))
        setattr(namespace, self.dest, items)


class InfoRequest(Exception):
    """An option that prints something and exits 0 (--firmware=list, …); carries the text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def info_request(ns: argparse.Namespace, as_json: bool = False) -> str | None:
    """Handle --firmware=list|describe and --firmware-features=list before any validation."""
    from vmspawnd.qemu import firmware as fw

    if ns.firmware == "list":
        found = fw.enumerate_descriptors()
        if as_json:
            return json.dumps([{"path": str(d.path), "description": d.description, "features": list(d.features),
                                "valid": d.valid} for d in found], indent=2)
        return fw.format_list(found)
    if "list" in ns.firmware_features:
        return "\n".join(fw.list_features(fw.enumerate_descriptors()))
    if ns.firmware == "describe":
        include, exclude = fw.parse_firmware_features(ns.firmware_features)
        chosen = fw.select_firmware(fw.enumerate_descriptors(), include=include, exclude=exclude)
        return fw.describe(chosen)
    return None


def _image(ns: argparse.Namespace) -> Drive | None:
    if not ns.image:
        for opt, value in (("image-format", ns.image_format), ("image-disk-type", ns.image_disk_type)):
            if value:
                raise ConfigError(opt, value, "needs --image")
        return None
    fmt = parse_enum("image-format", ns.image_format, ImageFormat) if ns.image_format else ImageFormat.RAW
    disk_type = (parse_enum("image-disk-type", ns.image_disk_type, DiskType) if ns.image_disk_type
                 else DiskType.VIRTIO_BLK)
    return Drive(_abspath(ns.image), fmt, disk_type)


def _credentials(ns: argparse.Namespace) -> tuple[tuple[str, bytes], ...]:
    creds = [parse_set_credential(v) for v in ns.set_credential]
    creds += [parse_load_credential(v) for v in ns.load_credential]
    check_unique(creds)
    return tuple(creds)


def _smbios11(values: list[str]) -> tuple[str, ...]:
    result: list[str] = []
    for value in values:
        if value == "":
            result.clear()
        else:
            result.append(value)
    return tuple(result)


def vmspawn_parser() -> OptionParser:
    """The full ``vmspawn`` command line."""
    parser = OptionParser(
        prog="vmspawn",
        description="Spawn a virtual machine with QEMU, the systemd-vmspawn way.",
        epilog="Exit status: the guest's EXIT_STATUS= if it sent one, 0 after a clean power-off, "
               "1 on setup errors or when QEMU was killed.",
    )
    parser.add_argument("--version", action="version", version=f"vmspawn {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not show status messages, and log only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what vmspawn does (info level)")
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="debug, info, notice, warning (the default), err…; also $SYSTEMD_LOG_LEVEL")
    parser.add_argument("--json", action="store_true", help="with --firmware=list: print JSON")
    parser.add_argument("--no-pager", action="store_true", help="accepted for compatibility (nothing is paged)")
    parser.add_argument("--no-ask-password", action="store_true",
                        help="accepted for compatibility (vmspawn never asks for a password)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--system", dest="manager", action="store_const", const="system",
                       help="use the system service manager and machined (the default, and only choice, as root)")
    scope.add_argument("--user", dest="manager", action="store_const", const="user",
                       help="use your user service manager (the default, and only choice, when not root)")
    add_machine_options(parser)
    parser.add_argument("--background", metavar="COLOR",
                        help="console background tint as ANSI SGR parameters (e.g. 48;2;0;64;0); "
                             "empty disables; default: a green tint matched to the terminal")
    return parser


def _check_manager(manager: str | None) -> None:
    """--system/--user: vmspawn talks to the system manager as root and to the user's own otherwise."""
    ours = "system" if os.geteuid() == 0 else "user"
    if manager is not None and manager != ours:
        raise ConfigError(manager, "", "not supported: vmspawn uses the system service manager as root and "
                          "your user service manager otherwise")


@dataclass(frozen=True)
class FrontEnd:
    """What only the foreground ``vmspawn`` takes from its command line, besides the machine."""

    background: str | None = None  # --background (validated), None: the default tint
    log_level: int = logging.WARNING


def parse_vmspawn_args(argv: list[str], with_front_end: bool = False, terminal: bool = True):
    """Parse a full vmspawn command line (options may follow kernel command-line words).

    Without a ``terminal`` (stdin and stdout), the default console is read-only, not interactive.
    Returns the MachineConfig, or (config, FrontEnd) with ``with_front_end``."""
    parser = vmspawn_parser()
    ns = parser.parse_intermixed_args(argv)
    if ns.console is None and not terminal:
        ns.console = ConsoleMode.READ_ONLY.value
    _check_manager(ns.manager)
    text = info_request(ns, as_json=getattr(ns, "json", False))
    if text is not None:
        raise InfoRequest(text)
    config = config_from_args(ns)
    if not with_front_end:
        return config
    try:
        level = command_level(ns.quiet, ns.verbose, ns.log_level)
    except ValueError as e:
        raise ConfigError("log-level", ns.log_level, str(e)) from None
    background = validate_background(ns.background) if ns.background is not None else None
    return config, FrontEnd(background, level)
