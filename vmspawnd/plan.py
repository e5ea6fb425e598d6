# SPDX-License-Identifier: LGPL-2.1-or-later
"""The launch plan: what this host offers one start of a machine, found out once, at the start.

A :class:`MachineConfig` is a definition and never looks at the host.  :func:`plan_launch`
does, in one place: the files and directories the definition names exist and fit, the firmware
(descriptor search included), whether ``--linux`` is a UKI, the virtiofsd that will serve
shares and what it can do, the host users ``--bind-user`` names, and the journal tools
``--forward-journal`` needs.  The run uses the plan; nothing probes the host again.  Clients
(``vmspawnctl``) never plan: the daemon does, on its own host.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from vmspawnd.services.virtiofsd import Virtiofsd, find_virtiofsd
from vmspawnd.values import path_problem


@dataclass(frozen=True)
class LaunchPlan:
    """What the host offers one start of one machine."""

    firmware: FirmwareChoice
    uki: bool  # --linux is a unified kernel image (its command line goes through SMBIOS)
    virtiofsd: Virtiofsd | None  # when the VM has shares (--directory, --bind, --bind-user)
    bound_users: tuple[BoundUser, ...] = ()


def plan_launch(config: MachineConfig) -> LaunchPlan:
    """Look at the host for ``config``; ConfigError names the setting the host cannot satisfy."""
    _check_files(config)
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
    return LaunchPlan(firmware, uki, virtiofsd, users)


def choose_firmware(config: MachineConfig) -> FirmwareChoice:
    """Resolve --firmware, --firmware-features and --secure-boot (descriptor search included)."""
    include, exclude = parse_firmware_features(config.firmware_features)  # --secure-boot= included, in order
    linux = config.linux if config.linux is not None and config.linux.is_file() else None
    return resolve_firmware(config.firmware, linux=linux, include=include, exclude=exclude)


def _check_files(config: MachineConfig) -> None:
    """The files and directories the definition names are there, and of the right kind."""
    if config.directory is not None and (problem := path_problem(config.directory, directory=True)):
        raise ConfigError("directory", str(config.directory), problem)
    for bind in config.binds:
        if problem := path_problem(bind.source, directory=True):
            raise ConfigError("bind-ro" if bind.read_only else "bind", str(bind.source),
                              f"{problem} (only directories can be shared)")
    for what, drive in [("image", config.image), *(("extra-drive", d) for d in config.extra_drives)]:
        if drive is not None:
            check_image(drive.path, drive.format, what)
    for what, path in [("linux", config.linux), *(("initrd", p) for p in config.initrds),
                       ("efi-nvram-template", config.efi_nvram_template)]:
        if path is not None and (problem := path_problem(path)):
            raise ConfigError(what, str(path), problem)
