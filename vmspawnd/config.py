# SPDX-License-Identifier: LGPL-2.1-or-later
"""MachineConfig: one VM's definition, plain data, checked as a definition once.

Both front ends (the ``vmspawn`` command line and the daemon's varlink API) build it through
settings.py; everything below them trusts it.  Invalid input raises :class:`ConfigError`, which
names the field, the value and what is wrong with it.  The host is never looked at here: the
launch plan (plan.py) does that when a machine starts.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmspawnd.errors import ConfigError
from vmspawnd.systemd.properties import parse_properties
from vmspawnd.values import (
    AUTO,
    DEFAULT_SLICE,
    Bind,
    ConsoleMode,
    ConsoleTransport,
    Drive,
    ImageFormat,
    Network,
    Ram,
    StateLocation,
    Tristate,
    check_unique,
    mangle_slice,
    parse_vsock_cid,
    valid_credential_id,
    validate_cpus,
    validate_key_type,
    validate_machine_name,
    validate_user_name,
)


@dataclass(frozen=True, slots=True)  # slots: a daemon keeps one per defined machine
class MachineConfig:
    """Everything that defines one VM: plain data (what the host offers is the launch plan's business,
    see plan.py).  Made by settings.py from a command line or JSON, through :meth:`validated`."""

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
    efi_nvram_template: Path | None = None
    efi_nvram_state: StateLocation = AUTO
    tpm: Tristate = Tristate.AUTO
    tpm_state: StateLocation = AUTO
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
    slice: str = DEFAULT_SLICE
    properties: tuple[str, ...] = ()
    keep_unit: bool = False
    quiet: bool = False

    def validated(self) -> MachineConfig:
        """Check every field and cross-option rule of the definition itself; return self or raise
        ConfigError.  Nothing on the host is looked at (see plan.py): a stored definition must not be
        lost because a disk is not mounted yet, and a client never probes the host it is not on."""
        validate_machine_name(self.name)
        validate_cpus(self.cpus)
        self.ram.validate()
        if self.vsock_cid is not None:
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
        if self.linux is None and self.image is None and self.directory is None:
            raise ConfigError("linux", "", "nothing to boot: pass --linux=KERNEL, --image=IMAGE or --directory=DIR, "
                              "or -M NAME with NAME.raw or NAME/ in a machine pool directory such as /var/lib/machines")
        if self.image is not None and self.directory is not None:
            raise ConfigError("directory", str(self.directory), "--directory and --image cannot be combined")
        if self.private_users is not None and self.directory is None:
            raise ConfigError("private-users", f"{self.private_users[0]}:{self.private_users[1]}",
                              "only valid with --directory")
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
        parse_properties(self.properties)  # unknown or malformed → ConfigError now, not at start
        mangle_slice(self.slice)
        if self.uuid is not None and self.uuid.int == 0:
            raise ConfigError("uuid", str(self.uuid), "the all-zero UUID is not allowed")
        for cred_id, _ in self.credentials:
            if not valid_credential_id(cred_id):
                raise ConfigError("credential", cred_id, "not a valid credential name")
        check_unique(list(self.credentials))
        if self.firmware in ("list", "describe"):
            raise ConfigError("firmware", self.firmware, "is an action, not a machine setting")
        if self.linux is None and self.firmware == "none":
            raise ConfigError("firmware", "none", "booting without firmware requires --linux=")
        return self

    def replace(self, **changes: Any) -> MachineConfig:
        return dataclasses.replace(self, **changes)

