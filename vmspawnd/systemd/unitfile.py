# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd.service as installed: units/vmspawnd.service filled in for the systemd that will run it.

``Type=notify-reload`` is new in systemd 253 and ``FileDescriptorStorePreserve=`` in 254.  An older
systemd (Debian 12's 252) ignores both with a warning, which would leave a ``Type=simple`` service
whose ``READY=1`` and ``FDSTORE=1`` it does not read and which ``systemctl reload`` cannot reload.
For it the service is ``Type=notify`` and is reloaded by a SIGHUP (``ExecReload=``), and its fd store
lasts across restarts only.

Command line (``make install``): ``python -m vmspawnd.systemd.unitfile TEMPLATE --bindir=DIR
--docdir=DIR [--systemd-version=N]`` writes the unit to standard output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

NOTIFY_RELOAD_SINCE = 253
STORE_PRESERVE_SINCE = 254
RELOAD_BY_SIGNAL = ("Type=notify\n", "ExecReload=/bin/kill -HUP $MAINPID\n")


def render(template: str, bindir: str, docdir: str, systemd_version: int | None = None) -> str:
    """The unit for ``systemd_version`` (None: the newest)."""
    text = template.replace("@BINDIR@", bindir).replace("@DOCDIR@", docdir)
    if systemd_version is None:
        return text
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if systemd_version < NOTIFY_RELOAD_SINCE and line.strip() == "Type=notify-reload":
            lines += RELOAD_BY_SIGNAL
        elif systemd_version < STORE_PRESERVE_SINCE and line.startswith("FileDescriptorStorePreserve="):
            continue
        else:
            lines.append(line)
    return "".join(lines)


def host_systemd_version() -> int | None:
    """``systemctl --version``'s number here; None where there is no systemctl."""
    try:
        words = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=False).stdout.split()
    except OSError:
        return None
    return int(words[1]) if len(words) > 1 and words[1].isdigit() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmspawnd.systemd.unitfile",
                                     description="Write vmspawnd.service for this host's systemd to standard output.")
    parser.add_argument("template", type=argparse.FileType("r"), help="units/vmspawnd.service")
    parser.add_argument("--bindir", required=True, help="where the vmspawnd command is")
    parser.add_argument("--docdir", required=True, help="where the README is")
    parser.add_argument("--systemd-version", type=int, default=None,
                        help="the systemd that will run it (default: this host's, or the newest without one)")
    args = parser.parse_args(argv)
    version = args.systemd_version if args.systemd_version is not None else host_systemd_version()
    sys.stdout.write(render(args.template.read(), args.bindir, args.docdir, version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
