# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU firmware descriptors ("interop" JSON): discovery, selection, NVRAM and QEMU arguments.

Search path, highest priority first: $XDG_CONFIG_HOME/qemu/firmware, /etc/qemu/firmware,
$XDG_DATA_HOME and $XDG_DATA_DIRS entries + /qemu/firmware, /usr/share/qemu/firmware.  A file
name in a higher-priority directory hides the same name below it; an empty file (or a link to
/dev/null) masks it.  The result is ordered by file name.

Everything here is pure: nothing starts QEMU.  Bad user input raises :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmspawnd.errors import ConfigError, naming_file
from vmspawnd.log import get_logger
from vmspawnd.qemu import qemu_escape
from vmspawnd.storage import remove_leftover_temps, temp_path
from vmspawnd.values import StateLocation, Tristate, parse_tristate, path_problem

log = get_logger()

DEFAULT_EXCLUDE: frozenset[str] = frozenset({"enrolled-keys"})
SECURE_BOOT_TOKEN = "secure-boot="
SECURE_BOOT = "secure-boot"
NVRAM_STATE_SUFFIX = ".efinvramstate"
TRANSIENT_NVRAM_NAME = "efinvram"
SECURE_PFLASH = "driver=cfi.pflash01,property=secure,value=on"
FLASH_MODES = ("split", "combined", "stateless")
_FORMAT_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def search_path() -> list[Path]:
    """The descriptor directories, highest priority first, without duplicates."""
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local/share")
    data_dirs = [Path(d) for d in (os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(":") if d]
    dirs = [config_home / "qemu/firmware", Path("/etc/qemu/firmware"),
            *(d / "qemu/firmware" for d in [data_home, *data_dirs]), Path("/usr/share/qemu/firmware")]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


# --------------------------------------------------------------------------------------------
# Descriptor model


class DescriptorError(ValueError):
    """A descriptor file is malformed or lacks a mandatory key."""


@dataclass(frozen=True)
class FirmwareImage:
    """A firmware file named by a descriptor, with its block format (raw, qcow2)."""

    filename: Path
    format: str = "raw"


@dataclass(frozen=True)
class Mapping:
    """How the firmware is mapped into the guest: ``flash`` (pflash drives) or ``memory`` (-bios)."""

    device: str
    executable: FirmwareImage
    nvram_template: FirmwareImage | None = None
    mode: str = "split"

    @property
    def stateless(self) -> bool:
        """No variable store: memory-mapped, or flash with mode=stateless."""
        return self.device == "memory" or self.mode == "stateless"


@dataclass(frozen=True)
class Target:
    """An architecture and the machine-type patterns (e.g. ``pc-q35-*``) the firmware runs on."""

    architecture: str
    machines: tuple[str, ...]

    def matches(self, arch: str, machine: str) -> bool:
        """Same architecture and some pattern contains ``machine`` as a substring."""
        return self.architecture == arch and any(machine in pattern for pattern in self.machines)


@dataclass(frozen=True)
class Descriptor:
    """One firmware descriptor file; ``valid`` is False (and ``problem`` says why) when unusable."""

    path: Path
    description: str | None = None
    interface_types: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    valid: bool = True
    mapping: Mapping | None = None
    targets: tuple[Target, ...] = ()
    tags: tuple[str, ...] = ()
    problem: str | None = None

    @property
    def secure_boot(self) -> bool:
        return SECURE_BOOT in self.features

    def supports(self, arch: str, machine: str) -> bool:
        """Some target matches the architecture and machine type."""
        return any(t.matches(arch, machine) for t in self.targets)


def _require(data: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    if key not in data:
        raise DescriptorError(f"missing mandatory key '{where}{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise DescriptorError(f"'{where}{key}' must be a {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES: dict[type, str] = {str: "string", list: "list", dict: "JSON object"}


def _strings(data: dict[str, Any], key: str, where: str = "") -> tuple[str, ...]:
    values = _require(data, key, list, where)
    if not all(isinstance(v, str) for v in values):
        raise DescriptorError(f"'{where}{key}' must be a list of strings")
    return tuple(values)


def _image(data: dict[str, Any], key: str) -> FirmwareImage:
    entry = _require(data, key, dict, "mapping.")
    filename = _require(entry, "filename", str, f"mapping.{key}.")
    fmt = _require(entry, "format", str, f"mapping.{key}.")
    if not _FORMAT_RE.match(fmt):
        raise DescriptorError(f"mapping.{key}.format {fmt!r} is not a block format name")
    return FirmwareImage(Path(filename), fmt)


def parse_mapping(data: dict[str, Any]) -> Mapping:
    """Parse the ``mapping`` object (device flash or memory)."""
    device = _require(data, "device", str, "mapping.")
    if device == "memory":
        filename = _require(data, "filename", str, "mapping.")
        return Mapping("memory", FirmwareImage(Path(filename), "raw"), mode="stateless")
    if device != "flash":
        raise DescriptorError(f"unsupported mapping device {device!r} (expected flash or memory)")
    mode = data.get("mode", "split")
    if mode not in FLASH_MODES:
        raise DescriptorError(f"mapping.mode {mode!r} is not one of {', '.join(FLASH_MODES)}")
    template = _image(data, "nvram-template") if "nvram-template" in data else None
    return Mapping("flash", _image(data, "executable"), template, mode)


def parse_targets(values: list[Any]) -> tuple[Target, ...]:
    """Parse the ``targets`` list of ``{architecture, machines}`` objects."""
    targets = []
    for i, entry in enumerate(values):
        if not isinstance(entry, dict):
            raise DescriptorError(f"targets[{i}] must be a JSON object")
        arch = _require(entry, "architecture", str, f"targets[{i}].")
        targets.append(Target(arch, _strings(entry, "machines", f"targets[{i}].")))
    return tuple(targets)


def parse_descriptor(path: Path, data: Any) -> Descriptor:
    """Build a :class:`Descriptor` from decoded JSON; raises :class:`DescriptorError`."""
    if not isinstance(data, dict):
        raise DescriptorError("not a JSON object")
    tags = _require(data, "tags", list)
    return Descriptor(path=path, description=_require(data, "description", str),
                      interface_types=_strings(data, "interface-types"), features=_strings(data, "features"),
                      data=data, mapping=parse_mapping(_require(data, "mapping", dict)),
                      targets=parse_targets(_require(data, "targets", list)), tags=tuple(str(t) for t in tags))


def load_descriptor(path: Path) -> Descriptor:
    """Parse one descriptor; a malformed one is returned with ``valid=False`` and the problem."""
    try:
        return parse_descriptor(path, json.loads(path.read_bytes(), object_pairs_hook=_no_duplicate_keys))
    except (OSError, ValueError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return Descriptor(path=path, valid=False, problem=problem)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key twice are malformed (systemd refuses them too)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate object field {key!r}")
        result[key] = value
    return result


def _masked(entry: Path) -> bool:
    try:
        return entry.resolve() == Path("/dev/null") or (entry.is_file() and entry.stat().st_size == 0)
    except OSError:
        return False


def enumerate_descriptors(dirs: list[Path] | None = None) -> list[Descriptor]:
    """Every descriptor in the search path, shadowed and masked by file name, sorted by file name."""
    chosen: dict[str, Path | None] = {}
    for directory in dirs if dirs is not None else search_path():
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith(".") or entry.name in chosen:
                continue
            if _masked(entry):
                chosen[entry.name] = None
            elif entry.is_file():  # regular files (or links to one); not dirs, not dangling links
                chosen[entry.name] = entry
    found = [load_descriptor(p) for _, p in sorted(chosen.items()) if p is not None]
    for descriptor in found:
        if not descriptor.valid:  # (one named by --firmware= is an error instead: _load_explicit)
            log.warning("skipping malformed firmware descriptor", path=str(descriptor.path), error=descriptor.problem)
    return found


# --------------------------------------------------------------------------------------------
# Features and selection


def parse_firmware_features(values: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Merge ``--firmware-features=`` values into (include, exclude).

    Each value is a comma list; ``~feat`` excludes.  The exclude set starts as {enrolled-keys};
    an empty value clears both sets, default included.  ``list`` is the front end's business.
    ``secure-boot=yes|no|auto`` items are ``--secure-boot=`` in its command-line position: yes
    requires the feature, no excludes it, auto forgets both (as systemd-vmspawn does).
    """
    include: set[str] = set()
    exclude: set[str] = set(DEFAULT_EXCLUDE)
    for value in values:
        if value == "":
            include.clear()
            exclude.clear()
            continue
        if value.startswith(SECURE_BOOT_TOKEN):  # --secure-boot=, applied where it stood on the command line
            setting = parse_tristate("secure-boot", value[len(SECURE_BOOT_TOKEN):])
            include.discard(SECURE_BOOT)
            exclude.discard(SECURE_BOOT)
            if setting is Tristate.YES:
                include.add(SECURE_BOOT)
            elif setting is Tristate.NO:
                exclude.add(SECURE_BOOT)
            continue
        for item in (i.strip() for i in value.split(",")):
            if item == "":
                continue
            if item == "list":
                raise ConfigError("firmware-features", value, "'list' is an action (alone, vmspawn prints the known "
                                  "features), not a feature")
            name = item.removeprefix("~")
            if not name or name.startswith("~"):
                raise ConfigError("firmware-features", value, "expected feature names, '~' to exclude one")
            (exclude if item.startswith("~") else include).add(name)
    return frozenset(include), frozenset(exclude)


def secure_boot_token(value: str) -> str:
    """``--secure-boot=VALUE`` as an item of the ordered firmware-features list."""
    parse_tristate("secure-boot", value)
    return SECURE_BOOT_TOKEN + value


def apply_secure_boot(include: Set[str], exclude: Set[str],
                      secure_boot: Tristate | str) -> tuple[frozenset[str], frozenset[str]]:
    """Fold ``--secure-boot=``: yes requires the secure-boot feature, no excludes it, auto neither."""
    setting = parse_tristate("secure-boot", secure_boot)
    if setting is Tristate.YES:
        return frozenset(include | {SECURE_BOOT}), frozenset(exclude)
    if setting is Tristate.NO:
        return frozenset(include), frozenset(exclude | {SECURE_BOOT})
    return frozenset(include), frozenset(exclude)


def rejection(descriptor: Descriptor, *, include: Set[str], exclude: Set[str],
              arch: str = "x86_64", machine: str = "q35") -> str | None:
    """Why ``descriptor`` cannot be auto-selected (the checks below, in order), or None if it can."""
    if not descriptor.valid or descriptor.mapping is None:
        return f"unusable: {descriptor.problem}"
    if "uefi" not in descriptor.interface_types:
        return "interface-types lacks uefi"
    if descriptor.mapping.nvram_template is None:
        return "no NVRAM template"
    if not descriptor.supports(arch, machine):
        return f"no target {arch} with a machine matching {machine}"
    missing = sorted(set(include) - set(descriptor.features))
    if missing:
        return f"lacks feature {', '.join(missing)}"
    excluded = sorted((set(exclude) - set(include)) & set(descriptor.features))
    if excluded:
        return f"has excluded feature {', '.join(excluded)}"
    return None


def _requirements(include: Set[str], exclude: Set[str], arch: str, machine: str) -> str:
    parts = ["interface uefi", "an NVRAM template", f"target {arch} with a machine matching {machine}"]
    if include:
        parts.append(f"features {', '.join(sorted(include))}")
    if set(exclude) - set(include):
        parts.append(f"none of {', '.join(sorted(set(exclude) - set(include)))}")
    return ", ".join(parts)


def select_firmware(descriptors: Iterable[Descriptor], *, include: Set[str], exclude: Set[str],
                    arch: str = "x86_64", machine: str = "q35") -> Descriptor:
    """The first descriptor (file-name order) passing every check of :func:`rejection`."""
    rejected: list[str] = []
    for d in descriptors:
        why = rejection(d, include=include, exclude=exclude, arch=arch, machine=machine)
        if why is None:
            log.debug("selected firmware descriptor", path=str(d.path))
            return d
        log.debug("firmware descriptor does not match", path=str(d.path), reason=why)
        rejected.append(f"{d.path.name}: {why}")
    looked = "; ".join(rejected) if rejected else "no descriptors found in " + ", ".join(map(str, search_path()))
    field, value = ("firmware-features", ",".join(sorted(include))) if include else ("firmware", "uefi")
    raise ConfigError(field, value, f"no firmware descriptor matches (needed "
                      f"{_requirements(include, exclude, arch, machine)}); {looked}")


def list_features(descriptors: Iterable[Descriptor]) -> list[str]:
    """``--firmware-features=list``: the sorted union of every descriptor's features."""
    return sorted({f for d in descriptors for f in d.features})


def format_list(descriptors: Iterable[Descriptor]) -> str:
    """``--firmware=list``: absolute descriptor paths, one per line (no trailing newline)."""
    return "\n".join(str(d.path.absolute()) for d in descriptors)


def describe(descriptor: Descriptor) -> str:
    """``--firmware=describe``: the descriptor's JSON, pretty-printed."""
    return json.dumps(descriptor.data, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# --firmware= resolution


class FirmwareKind(enum.Enum):
    UEFI = "uefi"
    BIOS = "bios"
    NONE = "none"


FIRMWARE_ACTIONS = ("list", "describe")


@dataclass(frozen=True)
class FirmwareChoice:
    """What boots the guest: a UEFI descriptor, QEMU's built-in BIOS, or nothing (direct kernel)."""

    kind: FirmwareKind
    descriptor: Descriptor | None = None
    reason: str = ""

    @property
    def smm(self) -> bool | None:
        """QEMU's ``smm=`` for this firmware: None without a UEFI descriptor (QEMU's default is left)."""
        return machine_smm(self.descriptor) if self.descriptor is not None else None

    def nvram_template(self, override: Path | None = None) -> Path | None:
        return nvram_template(self.descriptor, override) if self.descriptor else None

    def qemu_args(self, nvram: Path | None) -> list[str]:
        return qemu_firmware_args(self.descriptor, nvram) if self.descriptor else []


def is_pe_kernel(path: Path) -> bool:
    """True if ``path`` starts with an MZ header whose e_lfanew points at a ``PE\\0\\0`` signature."""
    with open(path, "rb") as f:
        header = f.read(0x40)
        if len(header) < 0x40 or header[:2] != b"MZ":
            return False
        (offset,) = struct.unpack_from("<I", header, 0x3C)
        f.seek(offset)
        return f.read(4) == b"PE\0\0"


def pe_section_names(path: Path) -> list[str]:
    """The section names of a PE image (empty if it is not one)."""
    with open(path, "rb") as f:
        header = f.read(0x40)
        if len(header) < 0x40 or header[:2] != b"MZ":
            return []
        (offset,) = struct.unpack_from("<I", header, 0x3C)
        f.seek(offset)
        coff = f.read(24)
        if len(coff) < 24 or coff[:4] != b"PE\0\0":
            return []
        count, optional_size = struct.unpack_from("<H", coff, 6)[0], struct.unpack_from("<H", coff, 20)[0]
        f.seek(offset + 24 + optional_size)
        table = f.read(40 * min(count, 96))
    return [table[i:i + 8].rstrip(b"\0").decode("ascii", "replace") for i in range(0, len(table) - 39, 40)]


def is_uki(path: Path) -> bool:
    """A unified kernel image: a PE with a ``.linux`` section (the kernel inside)."""
    return ".linux" in pe_section_names(path)


def _is_path_value(value: str) -> bool:
    return value.startswith("/") or value.startswith("./")


def _kernel_is_pe(linux: Path) -> bool:
    try:
        return is_pe_kernel(linux)
    except OSError as e:
        raise ConfigError("linux", linux, e.strerror or str(e)) from None


def check_choice(descriptor: Descriptor, *, include: Set[str] = frozenset()) -> None:
    """Checks made after selection or loading an explicit descriptor (combined mode, secure boot)."""
    if not descriptor.valid or descriptor.mapping is None:
        raise ConfigError("firmware", descriptor.path, f"unusable descriptor: {descriptor.problem}")
    if descriptor.mapping.mode == "combined":
        raise ConfigError("firmware", descriptor.path, "descriptors with mapping mode=combined are not supported")
    if SECURE_BOOT in include and not descriptor.secure_boot:
        raise ConfigError("firmware", descriptor.path, "Secure Boot was requested but the firmware lacks it")


def resolve_firmware(value: str, *, linux: Path | None = None, include: Set[str] = frozenset(),
                     exclude: Set[str] = DEFAULT_EXCLUDE, arch: str = "x86_64", machine: str = "q35",
                     descriptors: list[Descriptor] | None = None) -> FirmwareChoice:
    """Turn ``--firmware=auto|uefi|bios|none|PATH`` (empty = auto) into a :class:`FirmwareChoice`.

    ``list`` and ``describe`` print and exit: the front end handles them (see :func:`format_list`
    and :func:`describe`) and they are refused here.
    """
    value = value or "auto"
    if value in FIRMWARE_ACTIONS:
        raise ConfigError("firmware", value, "is an action that prints and exits, not a firmware choice")
    if value not in ("auto", "uefi", "bios", "none") and not _is_path_value(value):
        raise ConfigError("firmware", value, "expected auto, uefi, bios, none, list, describe or a descriptor "
                          "path (absolute or starting with ./)")
    if value == "bios":
        return FirmwareChoice(FirmwareKind.BIOS, reason="--firmware=bios")
    if value == "none":
        if linux is None:
            raise ConfigError("firmware", value, "booting without firmware requires --linux=")
        return FirmwareChoice(FirmwareKind.NONE, reason="--firmware=none")
    pe = _kernel_is_pe(linux) if linux is not None else True
    if value == "auto" and not pe:
        return FirmwareChoice(FirmwareKind.NONE, reason=f"--linux={linux} is not a PE image")
    if not pe:
        raise ConfigError("firmware", value, f"--linux={linux} is not a PE (EFI) image, so UEFI firmware cannot "
                          "boot it; use --firmware=none or --firmware=bios")
    if _is_path_value(value):
        descriptor = _load_explicit(Path(os.path.abspath(value)))
        check_choice(descriptor, include=include)
        return FirmwareChoice(FirmwareKind.UEFI, descriptor, reason=f"--firmware={value}")
    found = enumerate_descriptors() if descriptors is None else descriptors
    descriptor = select_firmware(found, include=include, exclude=exclude, arch=arch, machine=machine)
    check_choice(descriptor, include=include)
    return FirmwareChoice(FirmwareKind.UEFI, descriptor, reason=f"first match in {descriptor.path.parent}")


def _load_explicit(path: Path) -> Descriptor:
    try:
        if not path.is_file():
            raise ConfigError("firmware", path, "no such descriptor file")
    except OSError as e:  # (e.g. in a directory the VM's user cannot enter)
        raise ConfigError("firmware", path, e.strerror or str(e)) from None
    descriptor = load_descriptor(path)
    if not descriptor.valid:
        raise ConfigError("firmware", path, f"malformed descriptor: {descriptor.problem}")
    return descriptor


# --------------------------------------------------------------------------------------------
# NVRAM variable store


def nvram_template(descriptor: Descriptor | None, override: Path | None = None) -> Path | None:
    """The template for a new variable store (``--efi-nvram-template`` wins), None if stateless."""
    mapping = descriptor.mapping if descriptor else None
    if mapping is None or mapping.stateless:
        return None
    if override is not None:
        return override
    return mapping.nvram_template.filename if mapping.nvram_template else None


def nvram_state_path(location: StateLocation, image_or_directory: Path | None, ephemeral: bool) -> Path | None:
    """Where ``--efi-nvram-state=`` keeps the UEFI variables; None means "a transient copy in the
    runtime directory".  ``auto`` is ``<image-or-dir>.efinvramstate`` next to it, unless ephemeral
    or there is no image/directory."""
    return location.resolve(image_or_directory, ephemeral, NVRAM_STATE_SUFFIX)


def _copy_new(template: Path, target: Path, *, replace: bool) -> bool:
    """Copy ``template`` to ``target`` through a temp file; False if ``target`` appeared meanwhile."""
    remove_leftover_temps(target.parent, of=target.name)  # (a copy a crash interrupted)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with naming_file(target), os.fdopen(fd, "wb") as out, open(template, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
        with contextlib.suppress(OSError):
            st = os.stat(template)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        if replace:
            os.rename(tmp, target)
            return True
        try:
            os.link(tmp, target)  # unlike rename, never replaces an existing store
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_HARDLINKS or target.exists():  # e.g. vfat: check, then rename
                raise
            os.rename(tmp, target)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def prepare_nvram(template: Path, state: Path | None, runtime_dir: Path) -> Path:
    """The variable store QEMU should use, creating it from ``template`` if needed.

    An existing persistent store is reused untouched and never overwritten.  A new one is a copy
    of the template (mode 0600), made atomically.  ``state=None`` means a transient copy in
    ``runtime_dir``, removed together with it.
    """
    if problem := path_problem(template):
        raise ConfigError("efi-nvram-template", template, problem)
    if state is None:
        target = runtime_dir / TRANSIENT_NVRAM_NAME
        _copy_new(template, target, replace=True)
        return target
    if state.exists() or state.is_symlink():
        if not state.is_file():
            raise ConfigError("efi-nvram-state", state, "exists but is not a regular file")
        log.debug("reusing EFI NVRAM state", path=str(state))
        return state
    try:
        if _copy_new(template, state, replace=False):
            log.info("created EFI NVRAM state from template", path=str(state), template=str(template))
    except OSError as e:
        raise ConfigError("efi-nvram-state", state, f"cannot create: {e.strerror or e}") from None
    return state


# --------------------------------------------------------------------------------------------
# QEMU arguments


def machine_smm(descriptor: Descriptor | None) -> bool:
    """``-machine …,smm=on`` iff the firmware supports Secure Boot."""
    return descriptor is not None and descriptor.secure_boot


def qemu_firmware_args(descriptor: Descriptor | None, nvram: Path | None) -> list[str]:
    """QEMU arguments for the firmware (its pflash drives); none for ``bios``/``none`` (descriptor None).

    flash: read-only code pflash, then (if ``nvram`` is given and the mapping has state) the
    variable-store pflash in the executable's format.  memory: ``-bios PATH``.

    The x86 secure-pflash global (writes only from SMM) is added only together with ``smm=on``:
    a non-SMM OVMF cannot write a secure pflash and silently falls back to volatile variables.
    """
    if descriptor is None:
        return []
    check_choice(descriptor)
    assert descriptor.mapping is not None
    mapping, exe = descriptor.mapping, descriptor.mapping.executable
    if mapping.device == "memory":
        return ["-bios", str(exe.filename)]
    args = ["-drive", f"if=pflash,format={exe.format},readonly=on,file={qemu_escape(exe.filename)}"]
    if nvram is not None and not mapping.stateless:
        if machine_smm(descriptor):
            args += ["-global", SECURE_PFLASH]
        args += ["-drive", f"file={qemu_escape(nvram)},if=pflash,format={exe.format}"]
    return args
