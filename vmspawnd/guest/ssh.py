# SPDX-License-Identifier: LGPL-2.1-or-later
"""--pass-ssh-key: an ephemeral SSH key pair whose public half the guest's sshd accepts.

The pair is made with ``ssh-keygen`` in the VM's runtime directory (0700, removed with the run).
The guest gets the public key as the credential ``ssh.ephemeral-authorized_keys-all`` plus a
drop-in for ``sshd-vsock@.service`` (the unit systemd's ssh generator sets up for vsock) that
accepts it; machined learns the private key's path, so ``machinectl``/``ssh vsock/CID`` can use it.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.identity import ROOT, Identity, acting_as

AUTHORIZED_KEYS_CREDENTIAL = "ssh.ephemeral-authorized_keys-all"
SSHD_DROPIN_CREDENTIAL = "systemd.unit-dropin.sshd-vsock@.service"
SSHD_DROPIN = (
    "[Service]\n"
    "ExecStart=\n"
    f"ExecStart=sshd -i -o 'AuthorizedKeysFile=%d/{AUTHORIZED_KEYS_CREDENTIAL} .ssh/authorized_keys'\n"
    f"ImportCredential={AUTHORIZED_KEYS_CREDENTIAL}\n"
)


class SshKeyError(Exception):
    """ssh-keygen is missing or failed (the message says which)."""


@dataclass(frozen=True)
class SshKeyPair:
    private_key: Path

    @property
    def public_key(self) -> Path:
        return self.private_key.with_name(self.private_key.name + ".pub")

    def credentials(self) -> list[tuple[str, bytes]]:
        """What the guest needs to let the holder of the private key in."""
        return [(AUTHORIZED_KEYS_CREDENTIAL, self.public_key.read_bytes()),
                (SSHD_DROPIN_CREDENTIAL, SSHD_DROPIN.encode())]


async def generate_key_pair(directory: Path, key_type: str, comment: str, identity: Identity = ROOT) -> SshKeyPair:
    """Run ``ssh-keygen`` (as ``identity``) for a new unencrypted pair ``<directory>/ssh-<type>[.pub]``."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise SshKeyError("ssh-keygen not found (install openssh-client, or pass --pass-ssh-key=no)")
    private_key = directory / f"ssh-{key_type}"
    with acting_as(identity):
        for stale in (private_key, private_key.with_name(private_key.name + ".pub")):
            stale.unlink(missing_ok=True)  # a killed earlier run's pair: ssh-keygen would ask before overwriting
    proc = await asyncio.create_subprocess_exec(
        keygen, "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(private_key),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        **identity.popen_kwargs())
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise SshKeyError(f"ssh-keygen failed (exit status {proc.returncode}): {err.decode(errors='replace').strip()}")
    return SshKeyPair(private_key)
