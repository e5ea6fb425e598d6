# SPDX-License-Identifier: LGPL-2.1-or-later
"""The vmspawn command line: argv → MachineConfig, plus what only the foreground vmspawn takes.

The machine's options come from the settings table (settings.py), so ``vmspawn`` and
``vmspawnctl create`` offer the same ones with the same meaning.  Errors raise
:class:`ConfigError` (front ends exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from vmspawnd import __version__
from vmspawnd.config import MachineConfig
from vmspawnd.errors import ConfigError
from vmspawnd.images import find_machine_image
from vmspawnd.log import command_level
from vmspawnd.qemu import firmware as fw
from vmspawnd.settings import add_options, config_from_namespace
from vmspawnd.tint import validate_background
from vmspawnd.values import ConsoleMode, derive_machine_name, validate_machine_name


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ConfigError instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("arguments", "", message)


def _abspath(value: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(value)))


def add_machine_options(parser: argparse.ArgumentParser, create: bool = False) -> None:
    """Add every option that defines a machine (the settings table's) and, but for ``create``, -M/--machine."""
    add_options(parser, create=create)
    if create:  # (the machine's name is create's NAME)
        return
    ident = next(g for g in parser._action_groups if g.title == "System identity")
    ident.add_argument("-M", "--machine", metavar="NAME",
                       help="machine name (default, also when empty: from the image, directory or kernel file "
                            "name, the host's name for -D /; with -x plus a random suffix)")


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options and words, the words after ``--``): ``--`` ends the options."""
    end = argv.index("--") if "--" in argv else len(argv)
    return argv[:end], argv[end + 1:]


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and kernel command-line words in any order; every word after ``--`` (``-b``, ``-s``,
    ``--ram=1G``…) goes to the kernel as it is."""
    options, words = split_at_double_dash(argv)
    ns = parser.parse_intermixed_args(options)
    ns.cmdline = [*ns.cmdline, *words]
    return ns


def config_from_args(ns: argparse.Namespace, machine_pool: bool = True) -> MachineConfig:
    """Turn parsed options into a MachineConfig (checked as a definition; the host is the launch plan's).
    ``machine_pool``: -M NAME alone boots NAME from this host's machine pool (not for a client, whose
    host is not the one the VM runs on)."""
    if machine_pool and ns.machine and not ns.image and not ns.directory:
        _from_machine_pool(ns)
    if ns.machine:
        name = ns.machine
    elif ns.image or ns.directory or ns.linux:
        name = derive_machine_name(_abspath(ns.image or ns.directory or ns.linux))
        if ns.ephemeral:
            name = f"{name[:47]}-{os.urandom(8).hex()}"
    else:  # checked as if named: a bad option is named first, else "nothing to boot" (no --linux/--image)
        config_from_namespace(ns, "vm")
        raise ConfigError("machine", "", "pass -M/--machine=NAME, --image=IMAGE or --linux=KERNEL")
    config = config_from_namespace(ns, validate_machine_name(name))
    return config.replace(quiet=True) if getattr(ns, "quiet", False) else config


def _from_machine_pool(ns: argparse.Namespace) -> None:
    """-M NAME alone: boot NAME's image or directory from the machine pool (/var/lib/machines, …)."""
    found = find_machine_image(ns.machine)
    if found is None:
        return  # --linux alone may still boot; if not, validation says what is missing
    kind, path = found
    if kind == "image":
        ns.image = str(path)
    else:
        ns.directory = str(path)


class InfoRequest(Exception):
    """An option that prints something and exits 0 (--firmware=list, …); carries the text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def info_request(ns: argparse.Namespace, as_json: bool = False) -> str | None:
    """Handle --firmware=list|describe and --firmware-features=list before any validation."""
    features = ns.firmwareFeatures or []
    if ns.firmware == "list":
        found = fw.enumerate_descriptors()
        if as_json:
            return json.dumps([{"path": str(d.path), "description": d.description, "features": list(d.features),
                                "valid": d.valid} for d in found], indent=2)
        return fw.format_list(found)
    if "list" in features:
        return "\n".join(fw.list_features(fw.enumerate_descriptors()))
    if ns.firmware == "describe":
        include, exclude = fw.parse_firmware_features(features)
        chosen = fw.select_firmware(fw.enumerate_descriptors(), include=include, exclude=exclude)
        return fw.describe(chosen)
    return None


#: the synopsis, as systemd-vmspawn's (and not one argparse writes out of every option: ≈ 2 ms of each start
#: to format, since a parse of options mixed with words does it first, for its error messages)
USAGE = "%(prog)s [OPTIONS...] [ARGUMENTS...]"


def vmspawn_parser() -> OptionParser:
    """The full ``vmspawn`` command line."""
    parser = OptionParser(
        prog="vmspawn",
        usage=USAGE,
        description="Spawn a virtual machine with QEMU, the systemd-vmspawn way.",
        epilog="SIGTERM, SIGINT and SIGHUP ask the guest to power off (ACPI), forced after 10 s; a second "
               "one forces it at once.  Exit status: the guest's EXIT_STATUS= if it sent one, 0 after a clean "
               "power-off, 1 on setup errors or when QEMU was killed or forced off.",
    )
    parser.add_argument("--version", action="version", version=f"vmspawn {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not show status messages, and log only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what vmspawn does (info level)")
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="debug, info, notice, warning (the default), err…; also $SYSTEMD_LOG_LEVEL")
    parser.add_argument("--json", action="store_true", help="with --firmware=list: print JSON")
    parser.add_argument("--no-pager", action="store_true", help="accepted for compatibility (nothing is paged)")
    parser.add_argument("--no-ask-password", action="store_true",
                        help="accepted for compatibility (vmspawn never asks for a password)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--system", dest="manager", action="store_const", const="system",
                       help="use the system service manager and machined (the default, and only choice, as root)")
    scope.add_argument("--user", dest="manager", action="store_const", const="user",
                       help="use your user service manager (the default, and only choice, when not root)")
    add_machine_options(parser)
    parser.add_argument("--background", metavar="COLOR",
                        help="console background tint as ANSI SGR parameters (e.g. 48;2;0;64;0); "
                             "empty disables; default: a green tint matched to the terminal")
    return parser


def _check_manager(manager: str | None) -> None:
    """--system/--user: vmspawn talks to the system manager as root and to the user's own otherwise."""
    ours = "system" if os.geteuid() == 0 else "user"
    if manager is not None and manager != ours:
        raise ConfigError(manager, "", "not supported: vmspawn uses the system service manager as root and "
                          "your user service manager otherwise")


@dataclass(frozen=True)
class FrontEnd:
    """What only the foreground ``vmspawn`` takes from its command line, besides the machine."""

    background: str | None = None  # --background (validated), None: the default tint
    log_level: int = logging.WARNING


def parse_vmspawn_args(argv: list[str], terminal: bool = True) -> MachineConfig:
    """The machine a full vmspawn command line describes (options may follow kernel command-line words)."""
    return parse_vmspawn_command_line(argv, terminal)[0]


def parse_vmspawn_command_line(argv: list[str], terminal: bool = True) -> tuple[MachineConfig, FrontEnd]:
    """Parse a full vmspawn command line: the machine, and what only the foreground vmspawn takes.

    Without a ``terminal`` (stdin and stdout), the default console is read-only, not interactive."""
    ns = parse_command_line(vmspawn_parser(), argv)
    if ns.console is None and not terminal:
        ns.console = ConsoleMode.READ_ONLY.value
    _check_manager(ns.manager)
    text = info_request(ns, as_json=getattr(ns, "json", False))
    if text is not None:
        raise InfoRequest(text)
    config = config_from_args(ns)
    try:
        level = command_level(ns.quiet, ns.verbose, ns.log_level)
    except ValueError as e:
        raise ConfigError("log-level", ns.log_level, str(e)) from None
    background = validate_background(ns.background) if ns.background is not None else None
    return config, FrontEnd(background, level)
