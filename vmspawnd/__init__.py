# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd: run virtual machines the systemd way, from the command line or as a service."""

import os
import sys

__version__ = "0.1.0"


def docs_url() -> str:
    """Where this copy's README is (``varlinkctl info`` shows it as the URL).  Not by ``Path.as_uri``:
    from Python 3.14 on that imports urllib.request, and with it http.client, email, ssl and OpenSSL's
    libraries (with dbus-fast's hashlib, vmspawnd/lean.py: 6.5 MB resident in the daemon, for its life,
    measured in the forky tree)."""
    from pathlib import Path  # not at the top: `vmspawn` imports this package before it starts QEMU's launcher
    from urllib.parse import quote_from_bytes

    for readme in (Path(sys.prefix) / "share/doc/vmspawnd/README.md",
                   Path(__file__).resolve().parents[1] / "README.md"):
        if readme.is_file():
            return "file://" + quote_from_bytes(os.fsencode(readme))  # (a path of any bytes, as as_uri)
    return "file:///usr/local/share/doc/vmspawnd/README.md"
