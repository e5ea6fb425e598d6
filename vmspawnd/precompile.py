# SPDX-License-Identifier: LGPL-2.1-or-later
"""``python -m vmspawnd.precompile``: for an install (as :mod:`compileall` writes the ``.pyc`` files), what
every command would otherwise do once as it starts: import every module of our package, and write
the caches of its start (vmspawnd/modulecache.py, vmspawnd/methodcache.py), whatever
``$PYTHONDONTWRITEBYTECODE`` says.

The modules are found from the search path the commands have: the directory of the commands'
scripts first, where ``python -m`` (and ``-c``) put the current directory."""

import os
import sys
import sysconfig

from vmspawnd import modulecache


def main() -> None:
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = sysconfig.get_path("scripts")
    modulecache.install(with_loaded=True)  # (those of runpy and sysconfig too: the commands import some)
    import importlib  # (once the module cache is installed: it keeps these modules too)
    import pkgutil

    from vmspawnd import methodcache

    methodcache.install()
    package = os.path.dirname(os.path.abspath(methodcache.__file__))
    for module in pkgutil.walk_packages([package], prefix="vmspawnd."):
        importlib.import_module(module.name)
    methodcache.settle(write=True)
    modulecache.settle(write=True)


if __name__ == "__main__":
    main()
