# SPDX-License-Identifier: LGPL-2.1-or-later
"""The launch plan: what this host offers one start of a machine, found out once, at the start.

A :class:`MachineConfig` is a definition and never looks at the host.  :func:`plan_launch`
does, in one place: the files and directories the definition names exist and fit, the firmware
(descriptor search included), the kernel of a ``--directory`` booted without ``--linux``, whether
``--linux`` is a UKI, the virtiofsd that will serve
shares and what it can do, the host users ``--bind-user`` names, and the journal tools
``--forward-journal`` needs.  The run uses the plan; nothing probes the host again.  Clients
(``vmspawnctl``) never plan: the daemon does, on its own host.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from vmspawnd.bootentry import BootEntry, find_boot_entry
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.qemu.disks import check_image
from vmspawnd.qemu.firmware import (
    FirmwareChoice,
    FirmwareKind,
    is_uki,
    parse_firmware_features,
    resolve_firmware,
)
from vmspawnd.services.binduser import BoundUser, resolve_bound_users
from vmspawnd.services.journal import JOURNAL_REMOTE_PATHS, find_tool
from vmspawnd.services.virtiofsd import Flavour, Virtiofsd, find_virtiofsd
from vmspawnd.values import DEFAULT_SLICE, ImageFormat, Network, path_problem


@dataclass(frozen=True)
class LaunchPlan:
    """What the host offers one start of one machine."""

    firmware: FirmwareChoice
    uki: bool  # --linux is a unified kernel image (its command line goes through SMBIOS)
    virtiofsd: Virtiofsd | None  # when the VM has shares (--directory, --bind, --bind-user)
    bound_users: tuple[BoundUser, ...] = ()
    boot_entry: BootEntry | None = None  # a --directory without --linux boots this entry of its own

    def effective(self, config: MachineConfig) -> MachineConfig:
        """``config`` with the kernel and initrds this start boots."""
        if self.boot_entry is None:
            return config
        return dataclasses.replace(config, linux=self.boot_entry.linux, initrds=self.boot_entry.initrds)


def plan_launch(config: MachineConfig) -> LaunchPlan:
    """Look at the host for ``config``; ConfigError names the setting the host cannot satisfy."""
    _check_files(config)
    boot_entry = None
    if config.directory is not None and config.linux is None:
        boot_entry = find_boot_entry(config.directory)
        config = dataclasses.replace(config, linux=boot_entry.linux, initrds=boot_entry.initrds)
        _check_files(config)  # (its kernel and initrds are the VM's user's to read too)
    firmware = choose_firmware(config)
    uki = config.linux is not None and is_uki(config.linux)
    if uki and firmware.kind is not FirmwareKind.UEFI:
        raise ConfigError("firmware", config.firmware, f"{config.linux} is a unified kernel image (UKI), which "
                          "needs UEFI firmware")
    if config.forward_journal is not None:
        find_tool("systemd-socket-activate")
        find_tool("systemd-journal-remote", JOURNAL_REMOTE_PATHS)
    users = tuple(resolve_bound_users(config.bind_users, config.bind_user_shell, config.bind_user_groups))
    virtiofsd = find_virtiofsd() if config.directory is not None or config.binds or users else None
    if users and virtiofsd is not None and not virtiofsd.translate_ids:
        raise ConfigError("bind-user", config.bind_users[0], f"{virtiofsd.path} cannot translate UIDs, which "
                          "binding a user needs (install the Rust virtiofsd with --translate-uid)")
    return LaunchPlan(firmware, uki, virtiofsd, users, boot_entry)


def needs_privileges(config: MachineConfig, plan: LaunchPlan) -> list[tuple[str, str, str]]:
    """What in ``config`` a VM running as an unprivileged user cannot have: ``(setting, value, why)``
    each (empty when it can run as its owner)."""
    needs: list[tuple[str, str, str]] = []
    if config.network is Network.TAP:
        needs.append(("network-tap", "yes", "TAP networking needs CAP_NET_ADMIN"))
    if config.private_users is not None:
        needs.append(("private-users", f"{config.private_users[0]}:{config.private_users[1]}",
                      "mapping guest UIDs to other host UIDs needs root"))
    if config.bind_users:
        needs.append(("bind-user", config.bind_users[0], "binding host users maps their UIDs and copies their "
                                                         "password hashes, which needs root"))
    if config.ephemeral and config.directory is not None:
        needs.append(("ephemeral", "yes", "the --ephemeral copy of --directory keeps every file's owner, "
                                          "which needs root"))
    if config.keep_unit:
        needs.append(("keep-unit", "yes", "QEMU would run in vmspawnd's own unit"))
    if config.slice != DEFAULT_SLICE:
        needs.append(("slice", config.slice, "only root picks the slice of a VM's scope"))
    if config.properties:
        needs.append(("property", config.properties[0], "only root sets properties of a VM's scope"))
    virtiofsd = plan.virtiofsd
    shares = [("directory", config.directory, False)] if config.directory is not None else []
    shares += [("bind-ro" if b.read_only else "bind", b.source, b.read_only) for b in config.binds]
    for setting, source, read_only in shares:
        if virtiofsd is not None and virtiofsd.flavour is Flavour.C:
            needs.append((setting, str(source), f"{virtiofsd.path} (QEMU's C virtiofsd) runs only as root; "
                                                "install the Rust virtiofsd"))
        elif virtiofsd is not None and read_only and not virtiofsd.readonly:
            needs.append((setting, str(source), f"{virtiofsd.path} has no --readonly, and making a share "
                                                "read-only otherwise needs root"))
    return needs


def choose_firmware(config: MachineConfig) -> FirmwareChoice:
    """Resolve --firmware, --firmware-features and --secure-boot (descriptor search included)."""
    include, exclude = parse_firmware_features(config.firmware_features)  # --secure-boot= included, in order
    linux = config.linux if config.linux is not None and config.linux.is_file() else None
    return resolve_firmware(config.firmware, linux=linux, include=include, exclude=exclude)


def _check_files(config: MachineConfig) -> None:
    """The files and directories the definition names are there, of the right kind, and may be used
    with this thread's file-system credentials (the VM's user's inside
    :func:`~vmspawnd.identity.acting_as`): a user's VM is refused up front what the kernel would
    refuse that user."""
    rw, ro, search = os.R_OK | os.W_OK, os.R_OK, os.R_OK | os.X_OK
    disk = ro if config.ephemeral else rw
    named: list[tuple[str, Path | None, str | ImageFormat, int]] = [  # setting, path, kind, access needed
        ("directory", config.directory, "directory", search),
        *(("bind-ro" if b.read_only else "bind", b.source, "directory", search if b.read_only else search | rw)
          for b in config.binds),
        *(("image", d.path, d.format, disk) for d in (config.image,) if d is not None),
        *(("extra-drive", d.path, d.format, disk) for d in config.extra_drives),
        ("linux", config.linux, "file", ro), *(("initrd", p, "file", ro) for p in config.initrds),
        ("efi-nvram-template", config.efi_nvram_template, "file", ro),
    ]
    for what, path, kind, mode in named:
        if path is None:
            continue
        if isinstance(kind, ImageFormat):
            check_image(path, kind, what)
        elif problem := path_problem(path, directory=kind == "directory"):
            raise ConfigError(what, str(path), problem + (" (only directories can be shared)"
                                                          if what.startswith("bind") else ""))
        if not os.access(path, mode, effective_ids=True):
            raise ConfigError(what, str(path), "permission denied (" + ("read and write" if mode & os.W_OK
                                                                        else "read") + " access is needed)")
    journal = config.forward_journal
    written = [("tpm-state", config.tpm_state.path, "directory"),  # (explicit state paths only)
               ("efi-nvram-state", config.efi_nvram_state.path, "regular file"),
               ("forward-journal", journal, "regular file" if journal and journal.name.endswith(".journal")
                else "directory")]
    for what, path, kind in written:  # it, or the directory it will be created in, must be writable
        if path is None:
            continue
        if os.path.islink(path) and not os.path.exists(path):  # (os.path's: False where we may not look)
            raise ConfigError(what, str(path), "a symlink to nothing (a new state is never made through one)")
        if os.path.exists(path) and not (os.path.isdir if kind == "directory" else os.path.isfile)(path):
            raise ConfigError(what, str(path), f"exists but is not a {kind}")
        existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
        mode = rw if existing == path and not existing.is_dir() else os.W_OK | os.X_OK
        if not os.access(existing, mode, effective_ids=True):
            raise ConfigError(what, str(path), f"permission denied ({existing} is not writable)")
