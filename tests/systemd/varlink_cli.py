# SPDX-License-Identifier: LGPL-2.1-or-later
"""A stand-in for ``varlinkctl call [--more] ADDRESS METHOD JSON`` where systemd has none (it is new in
systemd 255; Debian 12 has 252): the replies' parameters as JSON on standard output, one object after
another; an error's name and parameters on standard error, with exit status 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # (run by path, as any user)

from tests.systemd.helpers import varlink_call  # noqa: E402


def main(argv: list[str]) -> int:
    more = "--more" in argv
    words = [a for a in argv if a != "--more"]
    if len(words) != 4 or words[0] != "call":
        print("usage: varlink_cli.py call [--more] ADDRESS METHOD JSON", file=sys.stderr)
        return 2
    _, address, method, parameters = words
    failed = False
    for reply in varlink_call(address, method, json.loads(parameters), more=more, timeout=120):
        if "error" in reply:
            print(f"Method call {method}() failed: {reply['error']}", file=sys.stderr)
            print(json.dumps(reply.get("parameters") or {}, indent=4), file=sys.stderr)
            failed = True
        elif reply.get("parameters"):
            print(json.dumps(reply["parameters"], indent=4))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
