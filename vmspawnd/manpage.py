# SPDX-License-Identifier: LGPL-2.1-or-later
"""Man pages made from the commands' own argparse parsers, so they never disagree with ``--help``.

``python -m vmspawnd.manpage DIR`` writes ``vmspawn.1``, ``vmspawnctl.1`` and ``vmspawnd.8``
(``make install`` installs them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmspawnd import __version__
from vmspawnd.cli import vmspawnctl, vmspawnd
from vmspawnd.options import vmspawn_parser

SEE_ALSO = "vmspawn(1), vmspawnctl(1), vmspawnd(8), systemd-vmspawn(1), machinectl(1), varlinkctl(1)"


def roff(text: str) -> str:
    """Plain text as roff: backslashes and leading dots or quotes cannot be taken as requests."""
    text = text.replace("\\", "\\e")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)  # groff reads ASCII
    lines = text.replace("-", "\\-").splitlines()
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in lines)


def _option_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    label = ", ".join(action.option_strings)
    if action.nargs != 0:
        label += f"={action.metavar or action.dest.upper()}"
    return label


def render(parser: argparse.ArgumentParser, name: str, section: int, summary: str) -> str:
    """The man page of ``parser``: synopsis, description, every visible option by group, subcommands."""
    out = [f'.TH "{name.upper()}" "{section}" "" "vmspawnd {__version__}" "vmspawnd"',
           ".SH NAME", roff(f"{name} - {summary}"),
           ".SH SYNOPSIS", roff(" ".join(parser.format_usage().removeprefix("usage: ").split())),
           ".SH DESCRIPTION", roff(parser.description or summary)]
    for group in parser._action_groups:  # argparse keeps its groups here (as --help walks them)
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        title = "OPTIONS" if group.title in ("options", "optional arguments") else (group.title or "").upper()
        out.append(f".SH {roff(title)}")
        for action in actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    out += [".TP", f".B {roff(choice.dest)}", roff(choice.help or "")]
                continue
            out += [".TP", f".B {roff(_option_label(action))}", roff(action.help or "")]
    if parser.epilog:
        out += [".SH NOTES", roff(parser.epilog)]
    out += [".SH SEE ALSO", roff(SEE_ALSO)]
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name → man page, for the three commands."""
    return {
        "vmspawn.1": render(vmspawn_parser(), "vmspawn", 1, "spawn a virtual machine the systemd-vmspawn way"),
        "vmspawnctl.1": render(vmspawnctl.build_parser(), "vmspawnctl", 1,
                               "control the virtual machines of vmspawnd (create takes vmspawn's options)"),
        "vmspawnd.8": render(vmspawnd.build_parser(), "vmspawnd", 8, "the virtual machine manager daemon"),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vmspawnd.manpage DIR", file=sys.stderr)
        return 2
    target = Path(argv[0])
    target.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (target / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
