"""``vmspawnd``: the daemon (not implemented yet)."""

import sys


def main() -> int:
    print("vmspawnd: not implemented yet", file=sys.stderr)
    return 1
