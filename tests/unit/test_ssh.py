# SPDX-License-Identifier: LGPL-2.1-or-later
"""--pass-ssh-key: real ssh-keygen runs, the credentials the guest gets, and the settings."""

from __future__ import annotations

import stat

import pytest

from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.guest.ssh import SSHD_DROPIN, SshKeyError, generate_key_pair
from vmspawnd.settings import config_from_json, config_to_json
from vmspawnd.values import Tristate


@pytest.mark.parametrize(("key_type", "prefix"), [("ed25519", "ssh-ed25519 "), ("rsa", "ssh-rsa "),
                                                  ("ecdsa", "ecdsa-sha2-nistp256 ")])
async def test_key_pair_is_made_private_and_its_public_half_is_the_credential(tmp_path, key_type, prefix):
    (tmp_path / f"ssh-{key_type}").write_text("a stale key of a killed run")
    pair = await generate_key_pair(tmp_path, key_type, "vmspawnd@vm")
    assert pair.private_key == tmp_path / f"ssh-{key_type}"
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert pair.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    public = pair.public_key.read_bytes()
    assert public.startswith(prefix.encode()) and public.rstrip().endswith(b" vmspawnd@vm")
    creds = dict(pair.credentials())
    assert creds["ssh.ephemeral-authorized_keys-all"] == public
    assert creds["systemd.unit-dropin.sshd-vsock@.service"] == SSHD_DROPIN.encode()
    assert "ImportCredential=ssh.ephemeral-authorized_keys-all" in SSHD_DROPIN


async def test_missing_ssh_keygen_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SshKeyError, match="ssh-keygen not found.*openssh-client"):
        await generate_key_pair(tmp_path, "ed25519", "x")


def test_settings_validate_and_round_trip(tmp_path):
    config = MachineConfig(name="vm", linux=tmp_path / "k", pass_ssh_key=Tristate.YES, ssh_key_type="rsa")
    data = config_to_json(config)
    assert (data["passSshKey"], data["sshKeyType"]) == ("yes", "rsa")
    again = config_from_json("vm", {**data, "linux": "/vmlinuz"})
    assert (again.pass_ssh_key, again.ssh_key_type) == (Tristate.YES, "rsa")
    with pytest.raises(ConfigError) as e:
        MachineConfig(name="vm", linux=tmp_path / "k", ssh_key_type="dsa").validated()
    assert e.value.field == "ssh-key-type" and "ed25519" in e.value.reason
