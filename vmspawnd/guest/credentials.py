# SPDX-License-Identifier: LGPL-2.1-or-later
"""System credentials for the guest (--set-credential, --load-credential, --smbios11).

Delivered as SMBIOS type-11 strings, each in its own 0600 file in the runtime dir
(``-smbios type=11,path=…``), so secrets stay out of ``ps`` and argv limits do not apply.
QEMU's SMBIOS 2.1 tables cannot exceed 64 KiB in all, so credentials that do not fit go through
QEMU's fw_cfg instead (``opt/io.systemd.credentials/<id>``, which systemd also imports).
"""

from __future__ import annotations

import base64
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vmspawnd.errors import ConfigError, naming_file
from vmspawnd.values import valid_credential_id

MAX_CREDENTIAL_SIZE = 1024 * 1024
#: What SMBIOS type-11 strings may take: QEMU refuses SMBIOS 2.1 tables over 65535 bytes, and the
#: other structures (BIOS, system, memory, CPUs…) need a few KiB of that.
SMBIOS_BUDGET = 56 * 1024
FW_CFG_PREFIX = "opt/io.systemd.credentials/"
FW_CFG_NAME_MAX = 55
#: QEMU's q35 has 32 fw_cfg file slots, most taken by its own files: leave it room.
FW_CFG_CREDENTIALS_MAX = 8


_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39, "s": 32}


def c_unescape(text: str, field: str = "set-credential") -> bytes:
    """Undo C escapes (\\n, \\t, \\xNN, \\NNN octal, \\uXXXX, \\UXXXXXXXX…); NUL bytes are allowed."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")  # (a command line's non-UTF-8 bytes, as they were)
            i += 1
            continue
        if i + 1 >= len(text):
            raise ConfigError(field, text, "trailing backslash")
        e = text[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e == "x" and _is_hex(text[i + 2:i + 4], 2):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif e in "uU" and _is_hex(text[i + 2:i + 2 + (4 if e == "u" else 8)], 4 if e == "u" else 8):
            n = 4 if e == "u" else 8
            code = int(text[i + 2:i + 2 + n], 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ConfigError(field, text, f"\\{e}{text[i + 2:i + 2 + n]} is no Unicode character")
            out += chr(code).encode()
            i += 2 + n
        elif e in "01234567" and len(text[i + 1:i + 4]) == 3 and all(ch in "01234567" for ch in text[i + 1:i + 4]):
            value = int(text[i + 1:i + 4], 8)
            if value > 255:
                raise ConfigError(field, text, f"invalid octal escape \\{text[i + 1:i + 4]}")
            out.append(value)
            i += 4
        else:
            raise ConfigError(field, text, f"invalid escape sequence \\{e}")
    return bytes(out)


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in "0123456789abcdefABCDEF" for c in s)


def _split(value: str, field: str) -> tuple[str, str]:
    cred_id, sep, rest = value.partition(":")
    if not sep or not valid_credential_id(cred_id):  # never echo the value: it may be a secret
        form = "ID:PATH" if field == "load-credential" else "ID:VALUE"
        raise ConfigError(field, cred_id if sep else "…", f"expected {form} with a valid credential name")
    return cred_id, rest


def parse_set_credential(value: str) -> tuple[str, bytes]:
    """``--set-credential=ID:VALUE`` (VALUE is C-unescaped)."""
    cred_id, data = _split(value, "set-credential")
    try:
        return cred_id, c_unescape(data)
    except ConfigError as e:  # name the credential, not its (secret) value
        raise ConfigError("set-credential", f"{cred_id}:…", e.reason) from None


def parse_load_credential(value: str) -> tuple[str, bytes]:
    """``--load-credential=ID:PATH``: a file, an AF_UNIX stream socket (connected and read), or a
    bare name looked up in our own $CREDENTIALS_DIRECTORY."""
    cred_id, source = _split(value, "load-credential")
    if not source:
        raise ConfigError("load-credential", value, "no path given")
    if "/" not in source:
        creds_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds_dir:
            raise ConfigError("load-credential", value, "a bare name needs $CREDENTIALS_DIRECTORY")
        path = Path(creds_dir) / source
    else:
        path = Path(os.path.abspath(source))
    try:
        if stat.S_ISSOCK(path.stat().st_mode):
            return cred_id, _read_socket(path)
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIAL_SIZE + 1)
    except OSError as e:
        raise ConfigError("load-credential", value, f"{path}: {e.strerror}") from None
    if len(data) > MAX_CREDENTIAL_SIZE:
        raise ConfigError("load-credential", value, "larger than 1 MiB")
    return cred_id, data


def _read_socket(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if len(data) > MAX_CREDENTIAL_SIZE:
                raise ConfigError("load-credential", str(path), "larger than 1 MiB")
    return data


def _write_private(path: Path, data: bytes) -> Path:
    """A new 0600 file (never an existing one, nor through a symlink)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with naming_file(path), os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass
class CredentialFiles:
    """Where the guest's credentials were written: SMBIOS type-11 strings and fw_cfg entries."""

    smbios: list[Path] = field(default_factory=list)
    fw_cfg: list[tuple[str, Path]] = field(default_factory=list)  # (fw_cfg name, file)


def _smbios_string(cred_id: str, data: bytes) -> bytes:
    return f"io.systemd.credential.binary:{cred_id}=".encode() + base64.b64encode(data)


def write_credentials(directory: Path, credentials: list[tuple[str, bytes]],
                      raw_strings: tuple[str, ...] = ()) -> CredentialFiles:
    """Write each credential (and each raw ``--smbios11=`` string) to its own private file: as an
    SMBIOS type-11 string while they fit in the SMBIOS budget (smallest first, so only big ones
    move), the rest as fw_cfg payloads.  ``directory`` is made here (it must not exist yet).

    Raises ConfigError when a credential fits neither way (or the raw strings alone are too big)."""
    directory.mkdir(mode=0o700)  # (new: in a run's new dir, so nothing in it is anyone else's)
    files = CredentialFiles()
    used = sum(len(os.fsencode(s)) + 1 for s in raw_strings)
    if used > SMBIOS_BUDGET:
        raise ConfigError("smbios11", f"{len(raw_strings)} strings", f"{used} bytes in all; SMBIOS takes at most "
                          f"{SMBIOS_BUDGET}")
    for cred_id, data in sorted(credentials, key=lambda c: len(c[0]) + len(c[1])):
        text = _smbios_string(cred_id, data)
        if used + len(text) + 1 <= SMBIOS_BUDGET:
            used += len(text) + 1
            files.smbios.append(_write_private(directory / cred_id, text))
            continue
        name = FW_CFG_PREFIX + cred_id
        if len(name) > FW_CFG_NAME_MAX:
            raise ConfigError("credential", cred_id, f"too large for SMBIOS ({len(data)} bytes; all credentials "
                              f"share {SMBIOS_BUDGET} bytes there, base64-encoded), and its name is too long for "
                              f"fw_cfg (at most {FW_CFG_NAME_MAX - len(FW_CFG_PREFIX)} characters)")
        if len(files.fw_cfg) >= FW_CFG_CREDENTIALS_MAX:
            raise ConfigError("credential", cred_id, f"too large for SMBIOS, and {FW_CFG_CREDENTIALS_MAX} "
                              "credentials already go through fw_cfg (QEMU has few slots)")
        (directory / "fw_cfg").mkdir(mode=0o700, exist_ok=True)
        path = _write_private(directory / "fw_cfg" / cred_id, data)
        path.chmod(0o400)
        files.fw_cfg.append((name, path))
    if raw_strings:  # a separate dir: a credential's ID can never collide with these names
        (directory / "raw").mkdir(mode=0o700, exist_ok=True)
    files.smbios += [_write_private(directory / "raw" / str(i), os.fsencode(s)) for i, s in enumerate(raw_strings)]
    return files
