# SPDX-License-Identifier: LGPL-2.1-or-later
"""The ``vmspawn`` command: start QEMU's exec-late launcher first, then do the work (foreground.py).

The launcher (execlate.py) is a second, bare interpreter that becomes QEMU.  Started here, before
the rest of vmspawn is imported, it comes up on the other CPU while vmspawn imports and sets up,
so QEMU's exec does not wait for its start-up.  Hence this module imports nothing heavy, and is
the one module that imports one of ours inside a function (tests/unit/test_layers.py).  Only the
``cli`` package comes first, and asyncio with it (cli/__init__.py): the launcher is still ready
long before vmspawn has QEMU's command line (bench/notes.md, session 19), so starting it before
asyncio would not bring QEMU's exec sooner.

As every command's, its modules are imported with the cyclic garbage collector off (cli/__init__.py).
"""

import os
import sys

from vmspawnd.cli import settle_caches
from vmspawnd.execlate import spawn


def main() -> int:
    try:
        launcher: tuple[int, int] | None = spawn(parent=os.getpid())
    except (OSError, NotImplementedError):  # (posix_spawn without setsid support)
        launcher = None  # the run starts one itself, and says what is wrong if it cannot
    from vmspawnd.cli.foreground import main as run_vmspawn  # after the launcher is on its way

    settle_caches()

    return run_vmspawn(launcher=launcher)


if __name__ == "__main__":
    sys.exit(main())
