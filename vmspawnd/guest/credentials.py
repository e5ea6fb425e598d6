"""System credentials for the guest, delivered as SMBIOS type-11 strings in 0600 files."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

_CRED_ID_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}$")


def valid_credential_id(cred_id: str) -> bool:
    return bool(_CRED_ID_RE.match(cred_id)) and cred_id not in (".", "..")


def write_smbios_credentials(directory: Path, credentials: list[tuple[str, bytes]]) -> list[Path]:
    """Write one file per credential (``io.systemd.credential.binary:ID=BASE64``) for ``-smbios type=11,path=``."""
    directory.mkdir(mode=0o700, exist_ok=True)
    paths = []
    for cred_id, data in credentials:
        path = directory / cred_id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(f"io.systemd.credential.binary:{cred_id}=".encode() + base64.b64encode(data))
        paths.append(path)
    return paths
