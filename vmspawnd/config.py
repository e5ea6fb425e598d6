# SPDX-License-Identifier: LGPL-2.1-or-later
"""MachineConfig: one VM's definition, validated once.

Both front ends (the ``vmspawn`` option parser and the daemon's varlink API) build a
:class:`MachineConfig`; everything below them trusts it.  Invalid input raises
:class:`ConfigError`, which names the field, the value and what is wrong with it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import errno
import math
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmspawnd.errors import ConfigError

MIB = 1024 * 1024
DEFAULT_RAM = 2 * 1024 * MIB
MAX_NAME_LENGTH = 64


def path_problem(path: Path, directory: bool = False) -> str | None:
    """What is wrong with a file (or directory) the configuration names, or None if it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return "no such file or directory" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
    if directory:
        return None if stat.S_ISDIR(mode) else "not a directory"
    return None if stat.S_ISREG(mode) else "no such file"


class Tristate(enum.Enum):
    """A boolean option that may also be left to auto-detection."""

    AUTO = "auto"
    YES = "yes"
    NO = "no"


class ConsoleMode(enum.Enum):
    INTERACTIVE = "interactive"
    READ_ONLY = "read-only"
    NATIVE = "native"
    GUI = "gui"
    HEADLESS = "headless"


class ConsoleTransport(enum.Enum):
    VIRTIO = "virtio"
    SERIAL = "serial"


class Network(enum.Enum):
    NONE = "none"
    USER = "user"
    TAP = "tap"


@dataclass(frozen=True)
class Bind:
    """``--bind=SRC[:DST]`` / ``--bind-ro=SRC[:DST]``: a host directory shared at DST in the guest."""

    source: Path
    destination: Path
    read_only: bool = False


class ImageFormat(enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DiskType(enum.Enum):
    VIRTIO_BLK = "virtio-blk"
    VIRTIO_SCSI = "virtio-scsi"
    NVME = "nvme"
    SCSI_CD = "scsi-cd"


@dataclass(frozen=True)
class Drive:
    """An image attached to the VM."""

    path: Path
    format: ImageFormat = ImageFormat.RAW
    disk_type: DiskType = DiskType.VIRTIO_BLK

    @property
    def is_block_device(self) -> bool:
        return stat.S_ISBLK(self.path.stat().st_mode)


TRUE_WORDS = {"1", "yes", "y", "true", "t", "on"}
FALSE_WORDS = {"0", "no", "n", "false", "f", "off"}
SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPEB]?)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?$")
_SMP_KEYS = {"cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads", "books", "drawers"}


def parse_bool(field: str, value: str | bool) -> bool:
    """Parse a systemd-style boolean (yes/no/1/0/true/false/on/off…)."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(field, value, "expected a boolean (yes/no)")


def parse_tristate(field: str, value: str | Tristate) -> Tristate:
    """Parse ``auto`` or a boolean into a :class:`Tristate`."""
    if isinstance(value, Tristate):
        return value
    if value.strip().lower() == "auto":
        return Tristate.AUTO
    return Tristate.YES if parse_bool(field, value) else Tristate.NO


def parse_enum(field: str, value: str | enum.Enum, kind: type[enum.Enum]) -> Any:
    """Parse one of an enum's values, with an error listing the valid ones."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ConfigError(field, value, f"expected one of: {choices}") from None


def parse_size(field: str, value: str | int) -> int:
    """Parse a size with base-1024 suffixes (K, M, G, T, P, E; bare number = bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(field, value, "must be positive")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(field, value, "expected a size such as 512M or 2G (suffixes K, M, G, T)")
    number, suffix = m.groups()
    size = math.ceil(float(number) * SIZE_SUFFIXES[suffix])
    if size <= 0:
        raise ConfigError(field, value, "must be positive")
    if size >= 1 << 63:
        raise ConfigError(field, value, "too large")
    return size


@dataclass(frozen=True)
class Ram:
    """Guest memory: initial size, optional hot-plug maximum and slot count."""

    size: int = DEFAULT_RAM
    max: int | None = None
    slots: int | None = None

    @property
    def size_mib(self) -> int:
        return -(-self.size // MIB)

    @property
    def max_mib(self) -> int | None:
        return None if self.max is None else -(-self.max // MIB)

    @classmethod
    def parse(cls, value: str, field: str = "ram") -> Ram:
        """Parse ``SIZE[:MAX[:SLOTS]]``."""
        parts = value.split(":")
        if len(parts) > 3:
            raise ConfigError(field, value, "expected SIZE[:MAX[:SLOTS]]")
        size = parse_size(field, parts[0])
        maximum = parse_size(field, parts[1]) if len(parts) > 1 and parts[1] else None
        slots: int | None = None
        if len(parts) > 2 and parts[2]:
            if not parts[2].isdigit() or int(parts[2]) < 1 or int(parts[2]) > 256:
                raise ConfigError(field, value, "slot count must be a number from 1 to 256")
            slots = int(parts[2])
        ram = cls(size, maximum, slots)
        ram.validate(field, value)
        return ram

    def validate(self, field: str = "ram", shown: object = None) -> None:
        shown = self.size if shown is None else shown
        if self.size <= 0:
            raise ConfigError(field, shown, "must be positive")
        if self.max is not None and self.max < self.size:
            raise ConfigError(field, shown, "maximum memory is smaller than the initial size")
        if self.slots is not None and self.max is None:
            raise ConfigError(field, shown, "memory slots need a maximum size (SIZE:MAX:SLOTS)")


def validate_cpus(value: str, field: str = "cpus") -> str:
    """Check a QEMU ``-smp`` value: a count, or ``[cpus=]N,key=value…`` with known keys."""
    text = str(value).strip()
    if not text:
        raise ConfigError(field, value, "must not be empty")
    items = text.split(",")
    for i, item in enumerate(items):
        key, sep, number = item.partition("=")
        if not sep:
            key, number = ("cpus", key) if i == 0 else ("", key)
        if key not in _SMP_KEYS or not number.isdigit() or int(number) < 1 or int(number) > 4096:
            raise ConfigError(field, value, "expected a CPU count (e.g. 2) or QEMU -smp syntax (e.g. cpus=2,sockets=1)")
    return text


def parse_private_users(value: str, field: str = "private-users") -> tuple[int, int]:
    """``UIDBASE[:NUIDS]`` (NUIDS defaults to 65536)."""
    base, _, count = value.partition(":")
    if not base.isdigit() or (count and not count.isdigit()):
        raise ConfigError(field, value, "expected UIDBASE[:NUIDS]")
    result = (int(base), int(count) if count else 65536)
    if result[1] < 1 or result[0] + result[1] > 1 << 32:
        raise ConfigError(field, value, "UID range out of bounds")
    return result


def parse_state_setting(value: str | None, field: str, relative_ok: bool = True) -> str:
    """PATH|auto|off (--tpm-state, --efi-nvram-state): booleans map to auto/off; a path must be
    absolute or start with ./ (made absolute here; over varlink only absolute paths make sense)."""
    if value is None:
        return "auto"
    if value in ("", "off") or value.lower() in FALSE_WORDS:
        return "off"
    if value == "auto" or value.lower() in TRUE_WORDS:
        return "auto"
    if "\0" in value or not (value.startswith("/") or (relative_ok and value.startswith("./"))):
        raise ConfigError(field, value, "a path must be absolute" + (" or start with ./" if relative_ok else ""))
    return os.path.abspath(value)


def validate_machine_name(value: str, field: str = "machine") -> str:
    """Machine names are hostnames: letters, digits and '-', 1–64 chars, no path tricks."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or len(value) > MAX_NAME_LENGTH:
        raise ConfigError(
            field, value, "a machine name is 1-64 letters, digits and '-', not starting or ending with '-'"
        )
    return value


def derive_machine_name(path: Path) -> str:
    """Derive a machine name from an image, directory or kernel file name."""
    name = path.name
    if name.endswith(".raw"):
        name = name[: -len(".raw")]
    name = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:MAX_NAME_LENGTH].strip("-")
    if not name:
        raise ConfigError("machine", "", f"cannot derive a machine name from {path}; pass -M/--machine=NAME")
    return name


@dataclass(frozen=True)
class MachineConfig:
    """Everything that defines one VM.  Construct it through :meth:`validated`."""

    name: str
    linux: Path | None = None
    initrds: tuple[Path, ...] = ()
    kernel_cmdline: tuple[str, ...] = ()
    ram: Ram = field(default_factory=Ram)
    cpus: str = "1"
    kvm: Tristate = Tristate.AUTO
    vsock: Tristate = Tristate.AUTO
    vsock_cid: int | None = None  # None: derived from the name
    notify_ready: bool = True
    console: ConsoleMode = ConsoleMode.INTERACTIVE
    console_transport: ConsoleTransport = ConsoleTransport.VIRTIO
    uuid: uuid.UUID | None = None
    credentials: tuple[tuple[str, bytes], ...] = ()
    smbios11: tuple[str, ...] = ()
    image: Drive | None = None
    extra_drives: tuple[Drive, ...] = ()
    discard_disk: bool = True
    grow_image: int = 0
    ephemeral: bool = False
    network: Network = Network.NONE
    firmware: str = "auto"
    firmware_features: tuple[str, ...] = ()
    secure_boot: Tristate = Tristate.AUTO
    efi_nvram_template: Path | None = None
    efi_nvram_state: str = "auto"
    tpm: Tristate = Tristate.AUTO
    tpm_state: str = "auto"
    directory: Path | None = None
    binds: tuple[Bind, ...] = ()
    private_users: tuple[int, int] | None = None  # (host UID base, count) for --directory
    bind_users: tuple[str, ...] = ()  # --bind-user: host users whose homes the VM gets
    bind_user_shell: str = "no"  # yes (the host's shell) | no | an absolute path
    bind_user_groups: tuple[str, ...] = ()  # extra groups of bound users in the VM
    pass_ssh_key: Tristate = Tristate.AUTO  # auto: when the guest has vsock
    forward_journal: Path | None = None  # a *.journal file or a directory (needs vsock)
    forward_journal_max_use: int | None = None
    forward_journal_keep_free: int | None = None
    forward_journal_max_file_size: int | None = None
    forward_journal_max_files: int | None = None
    ssh_key_type: str = "ed25519"
    register: Tristate = Tristate.AUTO
    slice: str = "machine.slice"
    properties: tuple[str, ...] = ()
    keep_unit: bool = False
    quiet: bool = False

    def validated(self, check_environment: bool = True) -> MachineConfig:
        """Check every field and cross-option rule; return self or raise ConfigError.

        ``check_environment=False`` checks only what the definition itself says (the daemon loading
        stored definitions must not lose one because a disk is not mounted yet); the files it names
        are checked again when the machine starts."""
        validate_machine_name(self.name)
        validate_cpus(self.cpus)
        self.ram.validate()
        if self.vsock_cid is not None:
            from vmspawnd.qemu.vsock import parse_vsock_cid

            parse_vsock_cid(self.vsock_cid)
            if self.vsock is Tristate.NO:
                raise ConfigError("vsock-cid", self.vsock_cid, "a CID for a guest without vsock (--vsock=no)")
        if self.forward_journal is None:
            for option, value in (("forward-journal-max-use", self.forward_journal_max_use),
                                  ("forward-journal-keep-free", self.forward_journal_keep_free),
                                  ("forward-journal-max-file-size", self.forward_journal_max_file_size),
                                  ("forward-journal-max-files", self.forward_journal_max_files)):
                if value is not None:
                    raise ConfigError(option, value, "only valid with --forward-journal")
        elif not self.forward_journal.is_absolute():
            raise ConfigError("forward-journal", str(self.forward_journal), "path must be absolute")
        elif self.vsock is Tristate.NO:
            raise ConfigError("forward-journal", str(self.forward_journal), "needs vsock, but --vsock=no")
        for option, value in (("forward-journal-max-use", self.forward_journal_max_use),
                              ("forward-journal-keep-free", self.forward_journal_keep_free),
                              ("forward-journal-max-file-size", self.forward_journal_max_file_size),
                              ("forward-journal-max-files", self.forward_journal_max_files)):
            if value is not None and not 0 < value < 1 << 63:
                raise ConfigError(option, value, "out of range")
        if self.initrds and self.linux is None:
            raise ConfigError("initrd", str(self.initrds[0]), "--initrd requires --linux")
        if self.directory is not None and self.linux is None:
            raise ConfigError("directory", str(self.directory), "booting a directory needs --linux=KERNEL")
        if self.linux is None and self.image is None:
            raise ConfigError("linux", "", "nothing to boot: pass --linux=KERNEL and/or --image=IMAGE, or -M NAME "
                              "with NAME.raw or NAME/ in a machine pool directory such as /var/lib/machines")
        if self.image is not None and self.directory is not None:
            raise ConfigError("directory", str(self.directory), "--directory and --image cannot be combined")
        if self.private_users is not None and self.directory is None:
            raise ConfigError("private-users", f"{self.private_users[0]}:{self.private_users[1]}",
                              "only valid with --directory")
        from vmspawnd.guest.ssh import validate_key_type
        from vmspawnd.services.binduser import validate_user_name

        validate_key_type(self.ssh_key_type)
        for user in self.bind_users:
            validate_user_name(user, "bind-user")
        for group in self.bind_user_groups:
            validate_user_name(group, "bind-user-group")
        if not self.bind_users and self.bind_user_groups:
            raise ConfigError("bind-user-group", self.bind_user_groups[0], "only valid with --bind-user")
        if not self.bind_users and self.bind_user_shell != "no":
            raise ConfigError("bind-user-shell", self.bind_user_shell, "only valid with --bind-user")
        if self.ephemeral and self.extra_drives:
            raise ConfigError("extra-drive", str(self.extra_drives[0].path), "cannot be combined with --ephemeral")
        if self.grow_image and self.image is not None and self.image.format is ImageFormat.QCOW2:
            raise ConfigError("grow-image", self.grow_image, "qcow2 images cannot be grown (not even with -x)")
        for what, path in [("linux", self.linux), *(("initrd", p) for p in self.initrds),
                           ("image", self.image.path if self.image else None),
                           *(("extra-drive", d.path) for d in self.extra_drives)]:
            if path is not None and not path.is_absolute():
                raise ConfigError(what, str(path), "path must be absolute")
        from vmspawnd.systemd.properties import parse_properties

        parse_properties(self.properties)  # unknown or malformed → ConfigError now, not at start
        if not re.match(r"^[A-Za-z0-9:_.\\-]+\.slice$", self.slice) or len(self.slice) > 255:
            raise ConfigError("slice", self.slice, "not a valid slice unit name")
        if self.uuid is not None and self.uuid.int == 0:
            raise ConfigError("uuid", str(self.uuid), "the all-zero UUID is not allowed")
        from vmspawnd.guest.credentials import check_unique, valid_credential_id

        for cred_id, _ in self.credentials:
            if not valid_credential_id(cred_id):
                raise ConfigError("credential", cred_id, "not a valid credential name")
        check_unique(list(self.credentials))
        if check_environment:
            self.check_environment()
        return self

    def check_environment(self) -> None:
        """The files, directories and firmware the configuration names exist and fit (at start too)."""
        if self.directory is not None and (problem := path_problem(self.directory, directory=True)):
            raise ConfigError("directory", str(self.directory), problem)
        for bind in self.binds:
            if problem := path_problem(bind.source, directory=True):
                raise ConfigError("bind-ro" if bind.read_only else "bind", str(bind.source), problem)
        from vmspawnd.qemu.disks import check_image

        for what, drive in [("image", self.image), *(("extra-drive", d) for d in self.extra_drives)]:
            if drive is not None:
                check_image(drive.path, drive.format, what)
        for what, path in [("linux", self.linux), *(("initrd", p) for p in self.initrds)]:
            if path is not None and (problem := path_problem(path)):
                raise ConfigError(what, str(path), problem)
        choice = self.firmware_choice()  # resolves --firmware/--firmware-features/--secure-boot or raises
        if self.linux is not None and self.linux_is_uki and choice.kind.value != "uefi":
            raise ConfigError("firmware", self.firmware, f"{self.linux} is a unified kernel image (UKI), which "
                              "needs UEFI firmware")
        if self.efi_nvram_template is not None and (problem := path_problem(self.efi_nvram_template)):
            raise ConfigError("efi-nvram-template", str(self.efi_nvram_template), problem)
        if self.forward_journal is not None:
            from vmspawnd.services.journal import JOURNAL_REMOTE_PATHS, find_tool

            find_tool("systemd-socket-activate")
            find_tool("systemd-journal-remote", JOURNAL_REMOTE_PATHS)
        if self.bind_users:
            from vmspawnd.services.binduser import resolve_bound_users
            from vmspawnd.services.virtiofsd import find_virtiofsd

            resolve_bound_users(self.bind_users, self.bind_user_shell, self.bind_user_groups)
            virtiofsd = find_virtiofsd()
            if not virtiofsd.translate_ids:
                raise ConfigError("bind-user", self.bind_users[0], f"{virtiofsd.path} cannot translate UIDs, which "
                                  "binding a user needs (install the Rust virtiofsd with --translate-uid)")

    def firmware_choice(self):
        """Resolve the firmware (descriptor search included) for this configuration."""
        from vmspawnd.qemu.firmware import apply_secure_boot, parse_firmware_features, resolve_firmware

        include, exclude = parse_firmware_features(self.firmware_features)
        include, exclude = apply_secure_boot(include, exclude, self.secure_boot)
        if self.linux is None and self.firmware == "none":
            raise ConfigError("firmware", "none", "booting without firmware requires --linux=")
        return resolve_firmware(self.firmware, linux=self.linux if self.linux and self.linux.is_file() else None,
                                include=include, exclude=exclude)

    @property
    def linux_is_uki(self) -> bool:
        from vmspawnd.qemu.firmware import is_uki

        return self.linux is not None and is_uki(self.linux)

    def replace(self, **changes: Any) -> MachineConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------- JSON form
# The daemon persists definitions and takes them over varlink in this one shape:
# camelCase keys, plain JSON values, every key optional except where noted.
JSON_FIELDS = ("linux", "initrds", "kernelCommandLine", "ram", "cpus", "kvm", "vsock", "vsockCid", "notifyReady",
               "console", "consoleTransport", "uuid", "credentials", "smbios11", "image", "imageFormat",
               "imageDiskType", "extraDrives", "discardDisk", "growImage", "ephemeral", "network", "firmware",
               "firmwareFeatures", "secureBoot", "efiNvramTemplate", "efiNvramState", "tpm", "tpmState",
               "directory", "binds", "privateUsers", "bindUsers", "bindUserShell", "bindUserGroups", "passSshKey",
               "sshKeyType", "forwardJournal", "forwardJournalMaxUse", "forwardJournalKeepFree",
               "forwardJournalMaxFileSize", "forwardJournalMaxFiles", "register",
               "slice", "properties", "keepUnit")


def config_to_json(config: MachineConfig) -> dict[str, Any]:
    """The JSON form of a config (the machine's name is kept outside it)."""
    ram = config.ram
    ram_text = str(ram.size) if ram.max is None else f"{ram.size}:{ram.max}:{ram.slots or ''}".rstrip(":")
    return {
        "linux": str(config.linux) if config.linux else None,
        "initrds": [str(p) for p in config.initrds],
        "kernelCommandLine": list(config.kernel_cmdline),
        "ram": ram_text,
        "cpus": config.cpus,
        "kvm": config.kvm.value,
        "vsock": config.vsock.value,
        "vsockCid": config.vsock_cid,
        "notifyReady": config.notify_ready,
        "console": config.console.value,
        "consoleTransport": config.console_transport.value,
        "uuid": str(config.uuid) if config.uuid else None,
        "credentials": [f"{cred_id}:{base64.b64encode(data).decode()}" for cred_id, data in config.credentials],
        "smbios11": list(config.smbios11),
        "image": str(config.image.path) if config.image else None,
        "imageFormat": config.image.format.value if config.image else None,
        "imageDiskType": config.image.disk_type.value if config.image else None,
        "extraDrives": [f"{d.format.value}:{d.disk_type.value}:{d.path}" for d in config.extra_drives],
        "discardDisk": config.discard_disk,
        "growImage": str(config.grow_image) if config.grow_image else None,
        "ephemeral": config.ephemeral,
        "network": config.network.value,
        "firmware": config.firmware,
        "firmwareFeatures": list(config.firmware_features),
        "secureBoot": config.secure_boot.value,
        "efiNvramTemplate": str(config.efi_nvram_template) if config.efi_nvram_template else None,
        "efiNvramState": config.efi_nvram_state,
        "tpm": config.tpm.value,
        "tpmState": config.tpm_state,
        "directory": str(config.directory) if config.directory else None,
        "binds": [f"{'ro' if b.read_only else 'rw'}:{_escape_colons(b.source)}:{_escape_colons(b.destination)}"
                  for b in config.binds],
        "privateUsers": f"{config.private_users[0]}:{config.private_users[1]}" if config.private_users else None,
        "bindUsers": list(config.bind_users),
        "bindUserShell": config.bind_user_shell,
        "bindUserGroups": list(config.bind_user_groups),
        "passSshKey": config.pass_ssh_key.value,
        "sshKeyType": config.ssh_key_type,
        "forwardJournal": str(config.forward_journal) if config.forward_journal else None,
        "forwardJournalMaxUse": config.forward_journal_max_use,
        "forwardJournalKeepFree": config.forward_journal_keep_free,
        "forwardJournalMaxFileSize": config.forward_journal_max_file_size,
        "forwardJournalMaxFiles": config.forward_journal_max_files,
        "register": config.register.value,
        "slice": config.slice,
        "properties": list(config.properties),
        "keepUnit": config.keep_unit,
    }


def _string_list(field: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(field, value, "expected a list of strings")
    if len(value) > 256 or sum(len(v) for v in value) > 65536:
        raise ConfigError(field, f"{len(value)} items", "too long")
    return value


def _path(field: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise ConfigError(field, value, "expected an absolute path")
    return Path(value)


def _string(field: str, value: Any, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ConfigError(field, value, f"expected a string of at most {limit} characters")
    return value


def config_from_json(name: str, data: dict[str, Any], check_environment: bool = True,
                     strict: bool = True) -> MachineConfig:
    """Build and validate a config from its JSON form; errors name the JSON field.  Not ``strict``
    (a stored definition, perhaps from a newer version): unknown fields are ignored, not refused."""
    try:
        if not strict and isinstance(data, dict):
            data = {k: v for k, v in data.items() if k in JSON_FIELDS}
        return _config_from_json(name, data, check_environment)
    except ConfigError as e:  # the shared checks speak of command-line options: name the JSON field
        raise ConfigError(json_field_name(e.field), e.value, e.reason) from None


def _config_from_json(name: str, data: dict[str, Any], check_environment: bool) -> MachineConfig:
    if not isinstance(data, dict):
        raise ConfigError("config", type(data).__name__, "expected an object")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], "", "unknown field")
    get = data.get
    try:
        machine_uuid = uuid.UUID(_string("uuid", get("uuid"))) if get("uuid") is not None else None
    except ValueError:
        raise ConfigError("uuid", get("uuid"), "not a valid UUID") from None
    notify_ready = _bool("notifyReady", get("notifyReady", True))
    config = MachineConfig(
        name=validate_machine_name(name, "name"),
        linux=_path("linux", get("linux")) if get("linux") is not None else None,
        initrds=tuple(_path("initrds", p) for p in _string_list("initrds", get("initrds"))),
        kernel_cmdline=tuple(_string_list("kernelCommandLine", get("kernelCommandLine"))),
        ram=Ram.parse(_string("ram", get("ram")), "ram") if get("ram") is not None else Ram(),
        cpus=validate_cpus(_string("cpus", get("cpus")), "cpus") if get("cpus") is not None else "1",
        kvm=parse_tristate("kvm", _string("kvm", get("kvm", "auto"))),
        vsock=parse_tristate("vsock", _string("vsock", get("vsock", "auto"))),
        vsock_cid=_vsock_cid(get("vsockCid")),
        notify_ready=notify_ready,
        console=parse_enum("console", _string("console", get("console", "headless")), ConsoleMode),
        console_transport=parse_enum("consoleTransport", _string("consoleTransport", get("consoleTransport",
                                                                                           "virtio")),
                                     ConsoleTransport),
        uuid=machine_uuid,
        credentials=tuple(_credential(c) for c in _string_list("credentials", get("credentials"))),
        smbios11=tuple(_string_list("smbios11", get("smbios11"))),
        image=_image(get("image"), get("imageFormat"), get("imageDiskType")),
        extra_drives=tuple(_extra_drive(v) for v in _string_list("extraDrives", get("extraDrives"))),
        discard_disk=_bool("discardDisk", get("discardDisk", True)),
        grow_image=parse_size("growImage", _string("growImage", get("growImage"))) if get("growImage") else 0,
        ephemeral=_bool("ephemeral", get("ephemeral", False)),
        network=parse_enum("network", _string("network", get("network", "none")), Network),
        firmware=_string("firmware", get("firmware", "auto"), 4096),
        firmware_features=tuple(_string_list("firmwareFeatures", get("firmwareFeatures"))),
        secure_boot=parse_tristate("secureBoot", _string("secureBoot", get("secureBoot", "auto"))),
        efi_nvram_template=(_path("efiNvramTemplate", get("efiNvramTemplate"))
                            if get("efiNvramTemplate") is not None else None),
        efi_nvram_state=parse_state_setting(_string("efiNvramState", get("efiNvramState", "auto"), 4096),
                                            "efiNvramState", relative_ok=False),
        tpm=parse_tristate("tpm", _string("tpm", get("tpm", "auto"))),
        tpm_state=parse_state_setting(_string("tpmState", get("tpmState", "auto"), 4096), "tpmState",
                                      relative_ok=False),
        directory=_path("directory", get("directory")) if get("directory") is not None else None,
        binds=tuple(_bind(v) for v in _string_list("binds", get("binds"))),
        private_users=(parse_private_users(_string("privateUsers", get("privateUsers")), "privateUsers")
                       if get("privateUsers") is not None else None),
        bind_users=tuple(_string_list("bindUsers", get("bindUsers"))),
        bind_user_shell=_bind_user_shell(get("bindUserShell")),
        bind_user_groups=tuple(_string_list("bindUserGroups", get("bindUserGroups"))),
        pass_ssh_key=parse_tristate("passSshKey", _string("passSshKey", get("passSshKey", "auto"))),
        ssh_key_type=_string("sshKeyType", get("sshKeyType", "ed25519")),
        forward_journal=_path("forwardJournal", get("forwardJournal")) if get("forwardJournal") is not None else None,
        forward_journal_max_use=_count("forwardJournalMaxUse", get("forwardJournalMaxUse")),
        forward_journal_keep_free=_count("forwardJournalKeepFree", get("forwardJournalKeepFree")),
        forward_journal_max_file_size=_count("forwardJournalMaxFileSize", get("forwardJournalMaxFileSize")),
        forward_journal_max_files=_count("forwardJournalMaxFiles", get("forwardJournalMaxFiles")),
        register=parse_tristate("register", _string("register", get("register", "auto"))),
        slice=_string("slice", get("slice", "machine.slice")),
        properties=tuple(_string_list("properties", get("properties"))),
        keep_unit=_bool("keepUnit", get("keepUnit", False)),
    )
    if config.firmware in ("list", "describe"):
        raise ConfigError("firmware", config.firmware, "is an action, not a machine setting")
    return config.validated(check_environment)


def json_field_name(option: str) -> str:
    """The JSON field for a command-line option name (``vsock-cid`` → ``vsockCid``, ``bind-user`` →
    ``bindUsers``); names that are no option of a field come back unchanged."""
    head, *rest = option.split("-")
    camel = head + "".join(word.capitalize() for word in rest)
    for candidate in (camel, camel + "s", {"bindRo": "binds", "property": "properties"}.get(camel, "")):
        if candidate in JSON_FIELDS:
            return candidate
    return option


def _escape_colons(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def split_escaped(value: str) -> list[str]:
    """Split on ':' not preceded by a backslash; ``\\:`` is ':' and ``\\\\`` is a backslash."""
    parts, current, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in ":\\":
            current.append(value[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def _bind(value: str) -> Bind:
    """``ro|rw:SOURCE:DESTINATION`` with ':' and '\\' in the paths escaped by a backslash."""
    parts = split_escaped(value)
    if len(parts) != 3 or parts[0] not in ("ro", "rw"):
        raise ConfigError("binds", value, "expected ro|rw:SOURCE:DESTINATION (escape ':' as \\:)")
    return Bind(_path("binds", parts[1]), _path("binds", parts[2]), parts[0] == "ro")


def _count(field: str, value: Any) -> int | None:
    """A positive integer (bytes or a count), or None."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 63:
        raise ConfigError(field, value, "expected a positive integer")
    return value


def _vsock_cid(value: Any) -> int | None:
    from vmspawnd.qemu.vsock import parse_vsock_cid

    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError("vsockCid", value, "expected an integer")
    return parse_vsock_cid(value, "vsockCid")


def _bind_user_shell(value: Any) -> str:
    from vmspawnd.services.binduser import parse_bind_user_shell

    return "no" if value is None else parse_bind_user_shell(_string("bindUserShell", value, 4096))


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, value, "expected true or false")
    return value


def _image(path: Any, fmt: Any, disk_type: Any) -> Drive | None:
    if path is None:
        return None
    return Drive(_path("image", path), parse_enum("imageFormat", _string("imageFormat", fmt or "raw"), ImageFormat),
                 parse_enum("imageDiskType", _string("imageDiskType", disk_type or "virtio-blk"), DiskType))


def _extra_drive(value: str) -> Drive:
    fmt, disk_type, path = (value.split(":", 2) + ["", "", ""])[:3]
    return Drive(_path("extraDrives", path), parse_enum("extraDrives", fmt, ImageFormat),
                 parse_enum("extraDrives", disk_type, DiskType))


def _credential(value: str) -> tuple[str, bytes]:
    cred_id, sep, data = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return cred_id, base64.b64decode(data, validate=True)
    except ValueError:
        raise ConfigError("credentials", f"{cred_id}:…", "expected ID:BASE64") from None
