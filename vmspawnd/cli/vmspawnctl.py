"""``vmspawnctl``: the daemon's client (not implemented yet)."""

import sys


def main() -> int:
    print("vmspawnctl: not implemented yet", file=sys.stderr)
    return 1
