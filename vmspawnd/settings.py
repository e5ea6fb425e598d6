# SPDX-License-Identifier: LGPL-2.1-or-later
"""Every VM setting, once: one :class:`Setting` record per setting, from which the rest is derived.

From :data:`SETTINGS` come the ``vmspawn`` and ``vmspawnctl create`` options
(:func:`add_options`), the command line → :class:`MachineConfig` step
(:func:`config_from_namespace`), the JSON form the daemon stores and serves
(:func:`config_to_json`, :func:`config_from_json`), the varlink ``Config`` type
(:func:`varlink_config_fields`, used by ``interface.Config``) and the help text.  A value given on
the command line and the same value given as JSON make the same configuration (a property test
checks it), because both go through the setting's one ``parse`` function.

Adding a setting: a :class:`MachineConfig` field, one entry here, and the code that uses it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.guest.credentials import parse_load_credential, parse_set_credential
from vmspawnd.qemu.argv import check_cmdline_length
from vmspawnd.qemu.firmware import parse_firmware_features, secure_boot_token
from vmspawnd.values import (
    AUTO,
    DEFAULT_SLICE,
    Bind,
    ConsoleMode,
    ConsoleTransport,
    DiskType,
    Drive,
    ImageFormat,
    Network,
    Ram,
    StateLocation,
    Tristate,
    error_text,
    escape_colons,
    is_decimal,
    mangle_slice,
    parse_bind_user_shell,
    parse_bool,
    parse_enum,
    parse_private_users,
    parse_size,
    parse_tristate,
    parse_vsock_cid,
    split_escaped,
    validate_cpus,
    validate_machine_name,
)

Parse = Callable[[Any, str], Any]  # (command-line text or JSON value, field name) → value


@dataclass(frozen=True)
class Setting:
    """One VM setting: how it is spelled on the command line and in JSON, parsed, shown and defaulted.

    ``parse`` takes one command-line occurrence (text) or one JSON value (text, or the JSON type
    given by ``json_type``) and returns the value; ``load`` replaces it for JSON where the two
    must differ (a relative ``./path`` is only meaningful on a command line).  ``repeat``: the
    option may be given several times and the JSON value is a list of such items.
    """

    key: str  # the JSON/varlink name; it names the setting in errors from JSON (and the argparse dest)
    attr: str | None  # the MachineConfig field (None: folded into another by _assemble)
    option: str | None  # the long option (None: JSON only)
    parse: Parse
    dump: Callable[[Any], Any]
    default: Any
    help: str = ""
    group: str = "Host configuration"
    metavar: str | None = None
    short: str | None = None
    aliases: tuple[str, ...] = ()  # hidden compatibility spellings (--qemu-mem)
    consts: tuple[tuple[str, str | None, str, str], ...] = ()  # (option, short, value, help) storing a value
    repeat: bool = False
    flag: bool = False  # store_true on the command line, a boolean in JSON
    json_type: type = str  # of one JSON item: str, bool or int
    json: bool = True  # part of the JSON form (False: a command-line way into another setting)
    load: Parse | None = None
    create: bool = True  # `vmspawnctl create` offers it
    #: the ordered list setting this one's command-line occurrences join, in command-line order
    #: (its JSON value goes last); then ``parse`` makes that list's item
    into: str | None = None
    #: its value in a MachineConfig, for settings folded into another field (default: the ``attr``
    #: field; a setting with neither shows no value of its own)
    read: Callable[[MachineConfig], Any] | None = None

    def field(self) -> str:
        """How errors name it on the command line."""
        return (self.option or self.key).lstrip("-")


# ----------------------------------------------------------------------------- item parsers
def _text(value: Any, field: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        nul = " and no NUL" if isinstance(value, str) and "\0" in value else ""
        raise ConfigError(field, value, f"expected a string of at most {limit} characters{nul}")
    return value


def _cli_path(value: Any, field: str) -> Path:
    """A path as given on a command line: made absolute (``~`` expanded); how long a path may be is
    the kernel's business (the launch plan reports what it says)."""
    text = _text(value, field, 1 << 20)
    if not text:
        raise ConfigError(field, value, "expected a path")
    return Path(os.path.abspath(os.path.expanduser(text)))


def _json_path(value: Any, field: str) -> Path:
    """A path over JSON: absolute, since the daemon has no working directory of the caller's."""
    text = _text(value, field)
    if not text.startswith("/"):
        raise ConfigError(field, value, "expected an absolute path")
    return Path(os.path.normpath(text))


def _bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    return parse_bool(field, _text(value, field, 16))


def _tristate(value: Any, field: str) -> Tristate:
    if isinstance(value, bool):
        return Tristate.YES if value else Tristate.NO
    return parse_tristate(field, _text(value, field, 16))


def _enum(kind: type) -> Parse:
    return lambda value, field: parse_enum(field, _text(value, field, 64), kind)


def _size(value: Any, field: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(field, value, "expected a size such as 512M")
    return parse_size(field, value, zero_ok=zero_ok)


def _optional_size(value: Any, field: str) -> int | None:
    return None if value in (None, "") else _size(value, field)


def _size_or_off(value: Any, field: str) -> int:
    """A size, where 0 (or empty) means none."""
    return 0 if value in (None, "") else _size(value, field, zero_ok=True)


def _count(value: Any, field: str) -> int:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _text(value, field, 32)
    if not is_decimal(text) or not 0 < int(text) < 1 << 63:
        raise ConfigError(field, value, "expected a positive number")
    return int(text)


def _vsock_cid(value: Any, field: str) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(field, value, "expected an integer")
    return parse_vsock_cid(value, field)


def _uuid(value: Any, field: str) -> uuid.UUID:
    try:
        parsed = uuid.UUID(_text(value, field, 64))
    except ValueError:
        raise ConfigError(field, value, "not a valid UUID") from None
    if parsed.int == 0:
        raise ConfigError(field, value, "the all-zero UUID is not allowed")
    return parsed


def _firmware(value: Any, field: str) -> str:
    text = _text(value, field)
    if text in ("list", "describe"):
        raise ConfigError(field, text, "is an action, not a machine setting")
    return os.path.abspath(text) if text.startswith(("./", "/")) else text or "auto"


def _json_firmware(value: Any, field: str) -> str:
    text = _text(value, field)
    if text.startswith("./"):
        raise ConfigError(field, value, "a descriptor path must be absolute")
    return _firmware(text, field)


def _state(value: Any, field: str) -> StateLocation:
    return StateLocation.parse(_text(value, field), field)


def _json_state(value: Any, field: str) -> StateLocation:
    return StateLocation.parse(_text(value, field), field, relative_ok=False)


def _ram(value: Any, field: str) -> Ram:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return Ram.parse(_text(value, field, 128), field)


def _dump_ram(ram: Ram) -> str:
    return str(ram.size) if ram.max is None else f"{ram.size}:{ram.max}:{ram.slots or ''}".rstrip(":")


def _cpus(value: Any, field: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return validate_cpus(_text(value, field, 256), field)


def _slice(value: Any, field: str) -> str:
    return mangle_slice(_text(value, field, 255), field)


def _string(value: Any, field: str) -> str:
    return _text(value, field, 4096)


def _key_type(value: Any, field: str) -> str:
    return _string(value, field) or "ed25519"


def _private_users(value: Any, field: str) -> tuple[int, int]:
    return parse_private_users(_text(value, field, 64), field)


def _bind_user_shell(value: Any, field: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return parse_bind_user_shell(_text(value, field), field)


def _cli_bind(read_only: bool) -> Parse:
    """``SRC[:DST]`` (``\\:`` is a literal colon); the source is checked on the host at start."""
    def parse(value: Any, field: str) -> Bind:
        text = _text(value, field, 1 << 20)
        parts = split_escaped(text)
        if len(parts) > 2 or not parts[0]:
            raise ConfigError(field, value, "expected SRC[:DST] (write \\: for a ':' in a path)")
        source = Path(os.path.abspath(parts[0]))
        destination = parts[1] if len(parts) == 2 and parts[1] else str(source)
        if not destination.startswith("/"):
            raise ConfigError(field, value, "the destination in the guest must be an absolute path")
        return Bind(source, Path(os.path.normpath(destination)), read_only)
    return parse


def _json_bind(value: Any, field: str) -> Bind:
    """``ro|rw:SOURCE:DESTINATION`` with ':' and '\\' in the paths escaped by a backslash."""
    parts = split_escaped(_text(value, field, 8200))
    if len(parts) != 3 or parts[0] not in ("ro", "rw"):
        raise ConfigError(field, value, "expected ro|rw:SOURCE:DESTINATION (escape ':' as \\:)")
    return Bind(_json_path(parts[1], field), _json_path(parts[2], field), parts[0] == "ro")


def _dump_bind(b: Bind) -> str:
    return f"{'ro' if b.read_only else 'rw'}:{escape_colons(b.source)}:{escape_colons(b.destination)}"


@dataclass(frozen=True)
class DriveSpec:
    """``[FORMAT:][TYPE:]PATH`` before the disk type a drive without one inherits is known."""

    path: Path
    format: ImageFormat = ImageFormat.RAW
    disk_type: DiskType | None = None


def _drive_spec(absolute: bool) -> Parse:
    def parse(value: Any, field: str) -> DriveSpec:
        rest, fmt, disk_type = _text(value, field), ImageFormat.RAW, None
        while True:
            head, sep, tail = rest.partition(":")
            if not sep:
                break
            if head in {f.value for f in ImageFormat}:
                fmt = ImageFormat(head)
            elif head in {d.value for d in DiskType}:
                disk_type = DiskType(head)
            else:
                break
            rest = tail
        path = _json_path(rest, field) if absolute else _cli_path(rest, field)
        return DriveSpec(path, fmt, disk_type)
    return parse


def _dump_drive(d: Drive) -> str:
    return f"{d.format.value}:{d.disk_type.value}:{d.path}"


def _json_credential(value: Any, field: str) -> tuple[str, bytes]:
    cred_id, sep, data = _text(value, field, 2 << 20).partition(":")
    try:
        if not sep:
            raise ValueError
        return cred_id, base64.b64decode(data, validate=True)
    except ValueError:
        raise ConfigError(field, f"{cred_id}:…", "expected ID:BASE64") from None


def _dump_credential(cred: tuple[str, bytes]) -> str:
    return f"{cred[0]}:{base64.b64encode(cred[1]).decode()}"


def _set_credential(value: Any, field: str) -> tuple[str, bytes]:
    return parse_set_credential(_text(value, field, 2 << 20))


def _load_credential(value: Any, field: str) -> tuple[str, bytes]:
    return parse_load_credential(_text(value, field))


def _same(value: Any) -> Any:
    return value


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _value_of(value: Any) -> Any:
    return value.value


def _value_or_none(value: Any) -> Any:
    return None if value is None else value.value


def _secure_boot(value: Any, field: str) -> str:
    """``--secure-boot=BOOL|auto`` as an item of the ordered --firmware-features list, so the two
    apply in the order given (``secureBoot`` in JSON applies after ``firmwareFeatures``)."""
    if isinstance(value, bool):
        value = "yes" if value else "no"
    text = _text(value, field, 16)
    parse_tristate(field, text)
    return secure_boot_token(text)


def _join_list(setting: Setting) -> type[argparse.Action]:
    """An action appending ``setting``'s item (made by its ``parse``) to the list of ``setting.into``."""
    class JoinList(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            items = list(getattr(namespace, self.dest, None) or [])
            items.append(setting.parse(values, setting.field()))
            setattr(namespace, self.dest, items)
    return JoinList


# ----------------------------------------------------------------------------- the table
IMAGE, HOST, MOUNTS, INTEGRATION, PROPS, NET, IDENT, EXEC, CREDS, IO = (
    "Image and boot", "Host configuration", "Mounts", "Integration", "Properties", "Networking",
    "System identity", "Execution", "Credentials", "Input/output")

SETTINGS: tuple[Setting, ...] = (
    Setting("linux", "linux", "--linux", _cli_path, _str_or_none, None, "boot this kernel directly (-kernel)",
            IMAGE, "PATH", load=_json_path),
    Setting("initrds", "initrds", "--initrd", _cli_path, str, (), "initrd for --linux; repeat to concatenate "
            "several", IMAGE, "PATH", repeat=True, load=_json_path),
    Setting("image", None, "--image", _cli_path, _str_or_none, None,
            "root disk image (regular file or block device)", IMAGE, "PATH", short="-i", load=_json_path,
            read=lambda c: c.image.path if c.image else None),
    Setting("imageFormat", None, "--image-format", _enum(ImageFormat), _value_or_none, ImageFormat.RAW,
            "raw (default) or qcow2", IMAGE, "FORMAT", read=lambda c: c.image.format if c.image else None),
    Setting("imageDiskType", None, "--image-disk-type", _enum(DiskType), _value_or_none, DiskType.VIRTIO_BLK,
            "virtio-blk (default), virtio-scsi, nvme or scsi-cd; extra drives inherit it", IMAGE, "TYPE",
            read=lambda c: c.image.disk_type if c.image else None),
    Setting("extraDrives", "extra_drives", "--extra-drive", _drive_spec(False), _dump_drive, (),
            "attach another disk image", IMAGE, "[FORMAT:][TYPE:]PATH", repeat=True, load=_drive_spec(True)),
    Setting("discardDisk", "discard_disk", "--discard-disk", _bool, _same, True,
            "let the guest's discard/TRIM reach the image (yes)", IMAGE, "BOOL", json_type=bool),
    Setting("growImage", "grow_image", "--grow-image", _size_or_off, lambda v: str(v) if v else None, 0,
            "grow the image file to at least this size (0: do not)", IMAGE, "BYTES", short="-G"),
    Setting("ephemeral", "ephemeral", "--ephemeral", _bool, _same, False,
            "run on a throw-away snapshot; the image is never written", IMAGE, short="-x", flag=True,
            json_type=bool),
    Setting("cpus", "cpus", "--cpus", _cpus, _same, "1",
            "number of virtual CPUs, or QEMU -smp syntax (default: 1)", HOST, "CPUS", aliases=("--qemu-smp",)),
    Setting("ram", "ram", "--ram", _ram, _dump_ram, Ram(),
            "guest memory, K/M/G/T suffixes, rounded up to MiB (default: 2G)", HOST, "BYTES[:MAX[:SLOTS]]",
            aliases=("--qemu-mem",)),
    Setting("kvm", "kvm", "--kvm", _tristate, _value_of, Tristate.AUTO,
            "use KVM (auto: only if /dev/kvm can run ordinary guests, else TCG)", HOST, "BOOL|auto",
            aliases=("--qemu-kvm",)),
    Setting("vsock", "vsock", "--vsock", _tristate, _value_of, Tristate.AUTO,
            "give the guest a vsock device: the kernel's /dev/vhost-vsock, else vhost-device-vsock (auto: if "
            "either is there)", HOST, "BOOL|auto",
            aliases=("--qemu-vsock",)),
    Setting("vsockCid", "vsock_cid", "--vsock-cid", _vsock_cid, _same, None,
            "the guest's vsock CID, 3…4294967294 (default: derived from the machine name; taken = error)",
            HOST, "CID", json_type=int),
    Setting("firmware", "firmware", "--firmware", _firmware, _same, "auto",
            "firmware: auto (UEFI unless --linux is not a PE kernel), uefi, bios (QEMU's built-in), none (direct "
            "kernel boot), a descriptor JSON; with vmspawn, list/describe print and exit", HOST,
            "auto|uefi|bios|none|PATH|list|describe", load=_json_firmware),
    Setting("firmwareFeatures", "firmware_features", "--firmware-features", _string, _same, (),
            "require (or with ~ exclude) descriptor features; default excludes enrolled-keys; with vmspawn, 'list' "
            "prints all features", HOST, "FEATURE[,~FEATURE…]|list", repeat=True),
    Setting("secureBoot", None, "--secure-boot", _secure_boot, lambda v: None, None,
            "require (yes) or exclude (no) Secure Boot firmware", HOST, "BOOL|auto", into="firmwareFeatures"),
    Setting("efiNvramTemplate", "efi_nvram_template", "--efi-nvram-template", _cli_path, _str_or_none, None,
            "UEFI variable store template to start from", HOST, "PATH", load=_json_path),
    Setting("efiNvramState", "efi_nvram_state", "--efi-nvram-state", _state, str, AUTO,
            "where UEFI variables persist (auto: <image>.efinvramstate; off: discarded)", HOST, "PATH|auto|off",
            load=_json_state),
    Setting("tpm", "tpm", "--tpm", _tristate, _value_of, Tristate.AUTO,
            "give the VM a TPM via swtpm (auto: if swtpm is installed)", HOST, "BOOL|auto"),
    Setting("tpmState", "tpm_state", "--tpm-state", _state, str, AUTO,
            "where TPM state persists (auto: <image-or-directory>.tpmstate; off: discarded)", HOST,
            "PATH|auto|off", load=_json_state),
    Setting("directory", "directory", "--directory", _cli_path, _str_or_none, None,
            "boot this directory tree as root fs (virtiofs); without --linux, the kernel of its boot loader "
            "entry (in its /boot or /efi)", MOUNTS, "PATH", short="-D", load=_json_path),
    Setting("privateUsers", "private_users", "--private-users", _private_users,
            lambda v: f"{v[0]}:{v[1]}" if v else None, None,
            "with --directory: guest UIDs 0… map to host UIDBASE… (needs the Rust virtiofsd)", MOUNTS,
            "UIDBASE[:NUIDS]"),
    Setting("bind", "binds", "--bind", _cli_bind(False), _dump_bind, (),
            "share a host directory with the guest (virtiofs, tag mnt0, mnt1, …)", MOUNTS, "SRC[:DST]",
            repeat=True, json=False),
    Setting("bindRo", "binds", "--bind-ro", _cli_bind(True), _dump_bind, (),
            "share a host directory read-only (enforced on the host)", MOUNTS, "SRC[:DST]", repeat=True, json=False),
    Setting("binds", "binds", None, _json_bind, _dump_bind, (), repeat=True),
    Setting("bindUsers", "bind_users", "--bind-user", _string, _same, (),
            "make a host user and their home (at /run/vmhost/home/NAME) available in the VM (needs the Rust "
            "virtiofsd and a guest with systemd's userdb)", MOUNTS, "NAME", repeat=True),
    Setting("bindUserShell", "bind_user_shell", "--bind-user-shell", _bind_user_shell, _same, "no",
            "give --bind-user users a login shell: the host's (yes), none (no, default) or PATH", MOUNTS,
            "BOOL|PATH"),
    Setting("bindUserGroups", "bind_user_groups", "--bind-user-group", _string, _same, (),
            "add --bind-user users to this extra group in the VM", MOUNTS, "GROUP", repeat=True),
    Setting("passSshKey", "pass_ssh_key", "--pass-ssh-key", _tristate, _value_of, Tristate.AUTO,
            "make an ephemeral SSH key pair and let it into the guest's sshd-vsock@.service (auto, the default: "
            "when the guest has vsock)", INTEGRATION, "BOOL|auto"),
    Setting("sshKeyType", "ssh_key_type", "--ssh-key-type", _key_type, _same, "ed25519",
            "ed25519 (default, also when empty), ecdsa or rsa", INTEGRATION, "TYPE"),
    Setting("forwardJournal", "forward_journal", "--forward-journal", _cli_path, _str_or_none, None,
            "receive the guest's journal (over vsock, with systemd-journal-remote) into a *.journal file or a "
            "directory", INTEGRATION, "FILE|DIR", load=_json_path),
    Setting("forwardJournalMaxUse", "forward_journal_max_use", "--forward-journal-max-use", _optional_size, _same,
            None, "journal-remote's --max-use=", INTEGRATION, "BYTES", json_type=int),
    Setting("forwardJournalKeepFree", "forward_journal_keep_free", "--forward-journal-keep-free", _optional_size,
            _same, None, "journal-remote's --keep-free=", INTEGRATION, "BYTES", json_type=int),
    Setting("forwardJournalMaxFileSize", "forward_journal_max_file_size", "--forward-journal-max-file-size",
            _optional_size, _same, None, "journal-remote's --max-file-size=", INTEGRATION, "BYTES", json_type=int),
    Setting("forwardJournalMaxFiles", "forward_journal_max_files", "--forward-journal-max-files", _count, _same,
            None, "journal-remote's --max-files=", INTEGRATION, "N", json_type=int),
    Setting("slice", "slice", "--slice", _slice, _same, DEFAULT_SLICE,
            "slice for the VM's scope (default: machine.slice; a name without .slice gets it)", PROPS, "SLICE",
            short="-S"),
    Setting("properties", "properties", "--property", _string, _same, (),
            "set a property on the VM's scope (systemctl set-property syntax; the resource control ones such as "
            "MemoryMax=, CPUQuota=, TasksMax=, IOWeight=, DeviceAllow=, and RuntimeMaxSec=, KillSignal=…: another "
            "is refused, naming those known)", PROPS, "NAME=VALUE", repeat=True),
    Setting("register", "register", "--register", _tristate, _value_of, Tristate.AUTO,
            "register the VM with systemd-machined (auto: if machined is running)", PROPS, "BOOL|auto"),
    Setting("keepUnit", "keep_unit", "--keep-unit", _bool, _same, False,
            "do not create a scope: QEMU stays in the caller's unit", PROPS, flag=True, json_type=bool),
    Setting("network", "network", None, _enum(Network), _value_of, Network.NONE, group=NET,
            consts=(("--network-tap", "-n", "tap", "TAP networking (interface vt-NAME; needs CAP_NET_ADMIN)"),
                    ("--network-user-mode", None, "user", "QEMU's user-mode networking"))),
    Setting("uuid", "uuid", "--uuid", _uuid, _str_or_none, None, "the machine's UUID (SMBIOS system UUID)", IDENT,
            "UUID"),
    Setting("notifyReady", "notify_ready", "--notify-ready", _bool, _same, True,
            "report READY=1 only once the guest did (default: yes)", EXEC, "BOOL", json_type=bool),
    Setting("setCredential", "credentials", "--set-credential", _set_credential, _dump_credential, (),
            "pass a credential to the guest (C escapes allowed)", CREDS, "ID:VALUE", repeat=True, json=False),
    Setting("loadCredential", "credentials", "--load-credential", _load_credential, _dump_credential, (),
            "pass a credential read from a file or AF_UNIX socket", CREDS, "ID:PATH", repeat=True, json=False),
    Setting("credentials", "credentials", None, _json_credential, _dump_credential, (), repeat=True),
    Setting("smbios11", "smbios11", "--smbios11", _string, _same, (),
            "pass a raw SMBIOS type 11 string (empty clears the list)", CREDS, "STRING", short="-s", repeat=True),
    Setting("console", "console", "--console", _enum(ConsoleMode), _value_of, ConsoleMode.INTERACTIVE,
            "interactive, read-only, native, gui or headless (a daemon's machine: interactive, read-only or "
            "headless) (default: interactive on a terminal, else read-only; "
            "vmspawnctl create: interactive, for vmspawnctl console; a Create call without it: headless)", IO,
            "MODE", consts=(("--qemu-gui", None, "gui", argparse.SUPPRESS),)),
    Setting("consoleTransport", "console_transport", "--console-transport", _enum(ConsoleTransport), _value_of,
            ConsoleTransport.VIRTIO, "virtio (hvc0, default) or serial (ttyS0) console device in the guest", IO,
            "TRANSPORT"),
    Setting("kernelCommandLine", "kernel_cmdline", None, _string, _same, (), repeat=True),
)

BY_KEY = {s.key: s for s in SETTINGS}
#: the settings that fill each MachineConfig field (several for folded ones: --bind, --bind-ro, binds)
BY_ATTR: dict[str, list[Setting]] = {}
for _setting in SETTINGS:
    if _setting.attr is not None:
        BY_ATTR.setdefault(_setting.attr, []).append(_setting)
JSON_FIELDS: tuple[str, ...] = tuple(s.key for s in SETTINGS if s.json)
#: JSON defaults a daemon applies where a command line's differ (no terminal to be interactive on)
DAEMON_DEFAULTS: dict[str, Any] = {"console": ConsoleMode.HEADLESS}


# ----------------------------------------------------------------------------- the command line
def add_options(parser: argparse.ArgumentParser, *, create: bool = False) -> None:
    """Add every machine setting's options (``create``: the ones ``vmspawnctl create`` offers)."""
    groups: dict[str, Any] = {}
    for s in SETTINGS:
        if create and not s.create:
            continue
        if (group := groups.get(s.group)) is None:  # (one per title: each made is kept by the parser)
            group = groups[s.group] = parser.add_argument_group(s.group)
        if s.into is not None:
            group.add_argument(s.option, dest=s.into, metavar=s.metavar, help=s.help, action=_join_list(s))
        elif s.option is not None:
            names = [n for n in (s.short, s.option) if n]
            if s.flag:
                group.add_argument(*names, dest=s.key, action="store_true", default=None, help=s.help)
            else:
                group.add_argument(*names, dest=s.key, metavar=s.metavar, help=s.help,
                                   action="append" if s.repeat else "store", default=None)
            for alias in s.aliases:
                group.add_argument(alias, dest=s.key, help=argparse.SUPPRESS)
        for option, short, value, text in s.consts:
            group.add_argument(*[n for n in (short, option) if n], dest=s.key, action="store_const", const=value,
                               help=text)
    parser.add_argument("cmdline", nargs="*", default=[], metavar="KERNEL-CMDLINE",
                        help="extra words for the guest's kernel command line")


def config_from_namespace(ns: argparse.Namespace, name: str) -> MachineConfig:
    """The configuration a parsed command line describes (checked as a definition, not against the host)."""
    given = {s.key: getattr(ns, s.key, None) for s in SETTINGS if (s.option is not None or s.consts) and not s.into}
    given["kernelCommandLine"] = list(ns.cmdline or [])
    values = {}
    for s in SETTINGS:
        raw = given.get(s.key)
        if raw is None or (s.repeat and not raw):
            continue
        values[s.key] = [s.parse(v, s.field()) for v in raw] if s.repeat else s.parse(raw, s.field())
    return _assemble(name, values, cli=True)


# ----------------------------------------------------------------------------- JSON
def config_to_json(config: MachineConfig, secrets: bool = True) -> dict[str, Any]:
    """The JSON form (camelCase keys, plain values; the machine's name is kept outside it).  Without
    ``secrets`` every credential's value is left out, and it is still a valid configuration: credentials
    keep their IDs (``ID:``, empty), SMBIOS strings and kernel command-line words that carry one end after
    its ID with "…".  (What Describe shows, and what a run records in run.json.)"""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if not s.json:
            continue
        if s.read is None and s.attr is None:  # folded into another setting's value, which shows it
            out[s.key] = None
            continue
        value = s.read(config) if s.read is not None else getattr(config, s.attr or s.key)
        if not secrets and (hide := _WITHOUT_SECRET.get(s.key)):  # (before encoding: a credential is up to 2 MiB)
            value = [hide(v) for v in value]
        out[s.key] = [s.dump(v) for v in value] if s.repeat else s.dump(value)
    return out


#: a credential on the kernel's command line, and the rest of its word (a word may hold several
#: parameters, spaced or quoted: everything after the first credential's ID is left out)
_CMDLINE_CREDENTIAL = r'((?:^|(?<=\s))"?systemd\.set_credential(?:_binary)?=[^:\s]*:).*'

def _credential_without_secret(credential: tuple[str, bytes] | str) -> tuple[str, bytes] | str:
    """A credential, (ID, value) or as its JSON is (ID:BASE64), without its value: (ID, b"") (which JSON
    shows as ``ID:``, still a valid credential), or ``ID:…``."""
    if isinstance(credential, tuple):
        return credential[0], b""
    return credential.split(":", 1)[0] + ":…"


#: the settings whose items may hold a credential's secret, and each item as shown without it (by
#: config_to_json without secrets, and by an error about it, which may be logged or shown by Describe)
_WITHOUT_SECRET: dict[str, Callable[[Any], Any]] = {
    "credentials": _credential_without_secret,
    "smbios11": lambda text: text.split("=", 1)[0] + "=…" if text.startswith("io.systemd.credential") else text,
    "kernelCommandLine": lambda word: re.sub(_CMDLINE_CREDENTIAL, r"\1…", word, flags=re.S),  # ID:VALUE -> ID:…
}


def config_from_json(name: str, data: Any, strict: bool = True) -> MachineConfig:
    """The configuration a JSON object describes; errors name the JSON field.  Not ``strict`` (a stored
    definition, perhaps from a newer version): unknown fields are ignored, not refused."""
    if not isinstance(data, dict):
        raise ConfigError("config", type(data).__name__, "expected an object")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown and strict:
        raise ConfigError(unknown[0], "", "unknown field")
    values = {}
    for key in JSON_FIELDS:
        s, raw = BY_KEY[key], data.get(key)
        if raw is None:
            continue
        parse = s.load or s.parse
        if s.repeat:
            if not isinstance(raw, list) or len(raw) > 256:
                raise ConfigError(key, _wrong_value(key, raw) if not isinstance(raw, list) else f"{len(raw)} items",
                                  "expected a list of at most 256 items")
            values[key] = [_json_item(s, v, parse) for v in raw]
        else:
            values[key] = _json_item(s, raw, parse)
    try:
        return _assemble(validate_machine_name(name, "name"), values, cli=False)
    except ConfigError as e:  # a cross-setting check names a command-line option: name the JSON field
        field = json_field_name(e.field)
        raise ConfigError(field, _shown(field, e.value), e.reason) from None


def _json_item(s: Setting, value: Any, parse: Parse) -> Any:
    if s.json_type is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif s.json_type is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(s.key, _wrong_value(s.key, value), f"expected {expected}")
    if isinstance(value, str) and not _encodable(value):  # JSON's "\ud800": no path or argument can carry it
        raise ConfigError(s.key, _shown(s.key, value), "expected text (it has a lone surrogate)")
    try:
        return parse(value, s.key)
    except ConfigError as e:
        raise ConfigError(e.field, _shown(s.key, e.value), e.reason) from None


_SHOWN_CHARS = 64  # of a wrong value's JSON in an error
_SHOWN_TEXT = 256  # of a value of the right type in an error
_JSON_TYPES = ((bool, "true or false"), ((int, float), "a number"), (str, "a string"), (list, "a list"),
               (dict, "an object"))


def _wrong_value(key: str, value: Any) -> str:
    """A value of the wrong JSON type as an error shows it: as JSON ("5" is not 5), cut short (it may be
    a megabyte); of a setting that may hold a credential's secret, only which JSON type it is (errors of
    a stored definition are logged, and Describe shows them)."""
    if key in _WITHOUT_SECRET:
        kind = next((name for types, name in _JSON_TYPES if isinstance(value, types)), "null")
        return f"({kind}, not shown)"
    return error_text(json.dumps(value), _SHOWN_CHARS)


def _shown(key: str, value: object) -> object:
    """A value of the right type as an error about ``key`` shows it: without a credential's secret where
    the setting may hold one, its control characters escaped, cut short (it may be a megabyte)."""
    if not isinstance(value, str):
        return value
    return error_text(_WITHOUT_SECRET[key](value) if key in _WITHOUT_SECRET else value, _SHOWN_TEXT)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def json_field_name(option: str) -> str:
    """The JSON field of a command-line option name (``vsock-cid`` → ``vsockCid``, ``bind-ro`` → ``binds``)."""
    for s in SETTINGS:
        if s.option is not None and s.option.lstrip("-") == option:
            return s.key if s.json else next(t.key for t in SETTINGS if t.json and t.attr == s.attr)
    return {"credential": "credentials", "initrd": "initrds", "machine": "name", "cmdline": "kernelCommandLine"
            }.get(option, option)


# ----------------------------------------------------------------------------- both
def _assemble(name: str, values: dict[str, Any], *, cli: bool) -> MachineConfig:
    """Defaults for what was not given, then the settings folded into one field (image, extra drives,
    binds, credentials, SMBIOS strings), then the definition's own checks."""
    def get(key: str) -> Any:
        return values.get(key, BY_KEY[key].default if cli or key not in DAEMON_DEFAULTS else DAEMON_DEFAULTS[key])

    image = None
    if "image" in values:
        image = Drive(values["image"], get("imageFormat"), get("imageDiskType"))
    else:
        for key in ("imageFormat", "imageDiskType"):
            if key in values:
                raise ConfigError(BY_KEY[key].field() if cli else key, values[key].value, "needs --image")
    inherited = image.disk_type if image is not None else DiskType.VIRTIO_BLK
    fields: dict[str, Any] = {}
    for attr, parts in BY_ATTR.items():
        s = parts[0]
        if s.repeat:
            fields[attr] = tuple(v for t in parts for v in values.get(t.key, ()))
        else:
            fields[attr] = get(s.key)
    fields["firmware_features"] += tuple(values[s.key] for s in SETTINGS if s.into and s.key in values)
    fields["extra_drives"] = tuple(Drive(d.path, d.format, d.disk_type or inherited) for d in fields["extra_drives"])
    fields["smbios11"] = _smbios11(fields["smbios11"])
    config = MachineConfig(name=name, image=image, **fields).validated()
    # what needs the QEMU layer's rules (config.py stays below it): a definition that could never start
    parse_firmware_features(config.firmware_features)  # (their syntax; which firmware has them is the plan's)
    check_cmdline_length(config, None)  # (with what the definition adds: a run adds TERM and more)
    return config


def _smbios11(values: Sequence[str]) -> tuple[str, ...]:
    """An empty string clears what came before it (as on upstream's command line)."""
    result: list[str] = []
    for value in values:
        if value == "":
            result.clear()
        else:
            result.append(value)
    return tuple(result)


def varlink_config_fields() -> list[tuple[str, Any]]:
    """(name, Python type) of each field of the varlink ``Config`` type, in table order; all optional."""
    fields: list[tuple[str, Any]] = []
    for s in SETTINGS:
        if not s.json:
            continue
        item: Any = s.json_type
        fields.append((s.key, (list[item] if s.repeat else item) | None))
    return fields
