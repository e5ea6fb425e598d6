# SPDX-License-Identifier: LGPL-2.1-or-later
"""The value types of a machine's settings, and the parsing and checking of one value.

The bottom of the package (it imports only :mod:`vmspawnd.errors`): everything that reads a
setting from a command line or from JSON, and everything that checks one, uses these.
Invalid input raises :class:`ConfigError`, naming the field, the value and what is wrong.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import re
import signal
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmspawnd import lean
from vmspawnd.errors import ConfigError

MIB = 1024 * 1024
DEFAULT_RAM = 2 * 1024 * MIB
MAX_NAME_LENGTH = 64


def sha256(text: str) -> bytes:
    """The SHA-256 digest of ``text`` (UTF-8), by hashlib without OpenSSL (lean.py), imported when a
    name first needs hashing."""
    return lean.hashlib().sha256(text.encode()).digest()


def path_problem(path: Path, directory: bool = False) -> str | None:
    """What is wrong with a file (or directory) the configuration names, or None if it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return "no such file or directory" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
    if directory:
        return None if stat.S_ISDIR(mode) else "not a directory"
    if stat.S_ISREG(mode):
        return None
    return "is a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file"


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
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPEB]?)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?\Z")
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
    """Parse ``auto`` (or empty: back to the default, auto) or a boolean into a :class:`Tristate`."""
    if isinstance(value, Tristate):
        return value
    if value.strip().lower() in ("auto", ""):
        return Tristate.AUTO
    try:
        return Tristate.YES if parse_bool(field, value) else Tristate.NO
    except ConfigError:
        raise ConfigError(field, value, "expected auto or a boolean (yes/no)") from None


def parse_enum(field: str, value: str | enum.Enum, kind: type[enum.Enum]) -> Any:
    """Parse one of an enum's values, with an error listing the valid ones."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ConfigError(field, value, f"expected one of: {choices}") from None


def parse_size(field: str, value: str | int, *, zero_ok: bool = False) -> int:
    """Parse a size with base-1024 suffixes (K, M, G, T, P, E; bare number = bytes); 0 only if ``zero_ok``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(field, value, "expected a size such as 512M or 2G (suffixes K, M, G, T)")
        number, suffix = m.groups()
        size = math.ceil(float(number) * SIZE_SUFFIXES[suffix])
    if size < 0 or (size == 0 and not zero_ok):
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
            if not is_decimal(parts[2]) or int(parts[2]) < 1 or int(parts[2]) > 256:
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


COMMAND_LINE_SIZE = 2048  # x86 kernel limit, with its final NUL


def check_kernel_cmdline(words: Sequence[str]) -> None:
    """Refuse kernel command-line words longer, together, than the kernel accepts."""
    cmdline = " ".join(words)
    if len(cmdline) >= COMMAND_LINE_SIZE:
        raise ConfigError("cmdline", f"{cmdline[:40]}…", f"kernel command line is {len(cmdline)} bytes, "
                          f"the limit is {COMMAND_LINE_SIZE - 1}")


#: the largest number any ``-smp`` key may have (QEMU's x86 machines allow at most 4096 CPUs)
MAX_SMP = 4096


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
        if key not in _SMP_KEYS or not is_decimal(number):
            raise ConfigError(field, value, "expected a CPU count (e.g. 2) or QEMU -smp syntax (e.g. cpus=2,sockets=1)")
        if not 1 <= int(number) <= MAX_SMP:
            where = "" if item == text else f"{key}={number}: "
            raise ConfigError(field, value, f"{where}must be between 1 and {MAX_SMP}")
    return text


def is_decimal(text: str) -> bool:
    """Only the digits 0-9 (``str.isdigit`` also takes ``²``, which ``int()`` refuses)."""
    return text.isascii() and text.isdigit()


def parse_private_users(value: str, field: str = "private-users") -> tuple[int, int]:
    """``UIDBASE[:NUIDS]`` (NUIDS defaults to 65536)."""
    base, _, count = value.partition(":")
    if not is_decimal(base) or (count and not is_decimal(count)):
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
            field, error_text(value, MAX_NAME_LENGTH) if isinstance(value, str) else value,
            "a machine name is 1-64 letters, digits and '-', not starting or ending with '-'"
        )
    return value


def derive_machine_name(path: Path) -> str:
    """Derive a machine name from an image, directory or kernel file name (the host's name for ``/``)."""
    name = socket.gethostname() if path == Path("/") else path.name
    if name.endswith(".raw"):
        name = name[: -len(".raw")]
    name = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:MAX_NAME_LENGTH].strip("-")
    if not name:
        raise ConfigError("machine", "", f"cannot derive a machine name from {path}; pass -M/--machine=NAME")
    return name



class StateKind(enum.Enum):
    AUTO = "auto"
    OFF = "off"
    PATH = "path"


@dataclass(frozen=True)
class StateLocation:
    """Where state persists (``--tpm-state=``, ``--efi-nvram-state=``): ``auto`` (beside the image or
    directory), ``off`` (discarded with the run) or an absolute path."""

    kind: StateKind = StateKind.AUTO
    path: Path | None = None

    @classmethod
    def parse(cls, value: str, field: str, relative_ok: bool = True) -> StateLocation:
        """PATH|auto|off; booleans map to auto/off; a path must be absolute or (``relative_ok``, the
        command line) start with ./, which is made absolute here."""
        word = value.strip().lower()
        if word in ("", "off") or word in FALSE_WORDS:
            return OFF
        if word == "auto" or word in TRUE_WORDS:
            return AUTO
        if "\0" in value or len(value) > 4096 or not (
                value.startswith("/") or (relative_ok and value.startswith("./"))):
            raise ConfigError(field, value, "a path must be absolute" + (" or start with ./" if relative_ok else ""))
        return cls(StateKind.PATH, Path(os.path.abspath(value)))

    def __str__(self) -> str:
        return str(self.path) if self.kind is StateKind.PATH else self.kind.value

    def resolve(self, base: Path | None, ephemeral: bool, suffix: str) -> Path | None:
        """The file or directory the state goes to, or None for a transient one: ``auto`` is
        ``<base><suffix>`` beside the image or directory (none if there is none, or the run is
        ephemeral), ``off`` is transient, a path is itself."""
        if self.kind is StateKind.PATH:
            return self.path
        if self.kind is StateKind.OFF or ephemeral or base is None:
            return None
        absolute = Path(os.path.abspath(base))
        return absolute.with_name(absolute.name + suffix)


AUTO = StateLocation()
OFF = StateLocation(StateKind.OFF)


def escape_colons(path: Path) -> str:
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



DEFAULT_SLICE = "machine.slice"


def mangle_slice(value: str, field: str = "slice") -> str:
    """``foo`` → ``foo.slice`` (as on the command line, so over varlink too); checks the unit name."""
    name = value if value.endswith(".slice") else f"{value}.slice"
    if not re.match(r"^[A-Za-z0-9:_.\\-]+\.slice$", name) or len(name) > 255:
        raise ConfigError(field, value, "not a valid slice unit name")
    return name


CID_MIN, CID_MAX = 3, 0xFFFFFFFE


def parse_vsock_cid(value: str | int | None, field: str = "vsock-cid") -> int | None:
    """``--vsock-cid=``: a guest CID from 3 to 4294967294; empty, ``any`` or -1 mean automatic (None)."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "any", "-1"):
        return None
    if text in ("hypervisor", "local", "host"):
        raise ConfigError(field, value, "a reserved CID; the guest needs a regular one (3…4294967294)")
    if not is_decimal(text) or not CID_MIN <= int(text) <= CID_MAX:
        raise ConfigError(field, value, "expected a CID from 3 to 4294967294 (or any)")
    return int(text)


def valid_signal(value: object) -> bool:
    """A signal this kernel has, as a number (the real-time ones too)."""
    return type(value) is int and value in signal.valid_signals()


def parse_signal(field: str, value: str) -> int:
    """A signal by number, or by name with or without ``SIG`` (``term``, ``SIGRTMIN+4``, ``RTMAX-1``)."""
    text = value.strip().upper().removeprefix("SIG")
    base, sign, offset = text.partition("+") if "+" in text else text.partition("-")
    number: int | None = None
    if is_decimal(text):
        number = int(text)
    elif base in ("RTMIN", "RTMAX") and (not sign or is_decimal(offset)):
        number = int(getattr(signal, f"SIG{base}")) + (int(offset or 0) * (1 if sign == "+" else -1))
    elif f"SIG{text}" in signal.Signals.__members__:
        number = int(signal.Signals[f"SIG{text}"])
    if number is None or not valid_signal(number):
        raise ConfigError(field, value, "not a signal (a name such as TERM or SIGRTMIN+4, or a number)")
    return number


KEY_TYPES = ("ed25519", "ecdsa", "rsa")


def validate_key_type(value: str, field: str = "ssh-key-type") -> str:
    if value not in KEY_TYPES:
        raise ConfigError(field, value, f"expected one of: {', '.join(KEY_TYPES)}")
    return value


_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")


def validate_user_name(value: str, field: str) -> str:
    """A portable user or group name (letters, digits, '_', '.', '-'; at most 32 characters)."""
    if not isinstance(value, str) or not _USER_RE.match(value):
        raise ConfigError(field, value, "not a valid user or group name")
    return value


def parse_bind_user_shell(value: str, field: str = "bind-user-shell") -> str:
    """``--bind-user-shell=BOOL|PATH``: ``yes`` (the host's shell), ``no`` (none) or an absolute path."""
    if value.lower() in TRUE_WORDS:
        return "yes"
    if value.lower() in FALSE_WORDS:
        return "no"
    if not value.startswith("/") or not value.isprintable() or len(value) > 4096:
        raise ConfigError(field, value, "expected a boolean or an absolute path")
    return value


def error_text(text: str, limit: int) -> str:
    """``text`` as an error shows it: its control characters escaped (:func:`printable`), cut at
    ``limit`` characters ("…" where it was cut: what a client sent may be a megabyte)."""
    return printable(text[:limit]) + ("…" if len(text) > limit else "")


def printable(text: str) -> str:
    """``text`` with its control characters shown as escapes (``\\x1b``): what a guest, a peer or a user
    wrote can never drive the reader's terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def valid_credential_id(cred_id: str) -> bool:
    """A credential ID is a file name: 1–255 printable characters, no '/', '=' or whitespace."""
    return (0 < len(cred_id) <= 255 and cred_id not in (".", "..") and cred_id.isprintable()
            and not any(c in cred_id for c in "/= \t"))


def check_unique(credentials: list[tuple[str, bytes]]) -> None:
    seen: set[str] = set()
    for cred_id, _ in credentials:
        if cred_id in seen:
            raise ConfigError("credential", cred_id, "the same credential ID is given twice")
        seen.add(cred_id)
