# SPDX-License-Identifier: LGPL-2.1-or-later
"""The package's layering (docs/architecture.md): no import cycles, no function-level import of our
own modules to dodge one, the value types at the bottom, and a client that never looks at the host."""

from __future__ import annotations

import ast
from pathlib import Path

from vmspawnd.cli.vmspawnctl import parse_create

PACKAGE = Path(__file__).resolve().parents[2] / "vmspawnd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, tuple[set[str], set[str]]]:
    """module → (our modules it imports at module level, those it imports inside functions)."""
    found = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top: set[str] = set()
        inner: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vmspawnd"):
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                targets = {n for n in names if n in modules} - {"vmspawnd"}
                (top if node in tree.body else inner).update(targets)
        found[module_name(path)] = (top, inner)
    return found


def import_graph() -> dict[str, set[str]]:
    """module → our modules it imports at module level."""
    return {m: top for m, (top, _) in imports().items()}


#: the `vmspawn` command imports its work only after it has started QEMU's launcher (see its docstring),
#: a run what serves its control socket (with asyncvarlink) only once it is called (systemd/control.py),
#: the caches of a command's start storage.py (json, logging) only to write them (methodcache.py, modulecache.py),
#: and an install's precompile the rest only once the module cache is installed
DEFERRED = {"vmspawnd.cli.vmspawn": ["vmspawnd.cli.foreground"], "vmspawnd.run": ["vmspawnd.systemd.instance"],
            "vmspawnd.systemd.control": ["vmspawnd.systemd.instance"], "vmspawnd.methodcache": ["vmspawnd.storage"],
            "vmspawnd.modulecache": ["vmspawnd.storage"], "vmspawnd.precompile": ["vmspawnd.methodcache"]}


def test_no_module_imports_our_modules_inside_a_function() -> None:
    inner = {m: sorted(i) for m, (_, i) in imports().items() if i and not m.startswith("vmspawnd.testing")}
    assert inner == DEFERRED, inner


def test_there_is_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_values_and_errors_are_the_bottom() -> None:
    found = imports()
    assert found["vmspawnd.errors"][0] == found["vmspawnd.lean"][0] == set()
    assert found["vmspawnd.values"][0] == {"vmspawnd.errors", "vmspawnd.lean"}
    assert found["vmspawnd.config"][0] <= {"vmspawnd.errors", "vmspawnd.values", "vmspawnd.systemd.properties"}


def test_vmspawnctl_create_does_not_look_at_the_host_it_runs_on() -> None:
    name, config = parse_create(["web", "--linux=/nonexistent/vmlinuz", "--bind=/nonexistent/share",
                                 "--image=/nonexistent/disk.raw", "--firmware=uefi"])
    assert name == "web" and config.linux == Path("/nonexistent/vmlinuz")  # the daemon checks, on its host


def reached(start: str) -> set[str]:
    """Our modules ``start`` loads (itself too), following module-level imports."""
    graph = import_graph()
    found, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo += graph.get(module, ())
    return found


def test_vmspawnctl_imports_the_interface_not_the_daemon() -> None:
    """A client starts without loading what the daemon runs (its start-up time: every command): only
    the interface, vmspawn's option parser (``create``), the console forwarder and the vsock connector
    (and what the ``cli`` package loads for every command)."""
    client = reached("vmspawnd.cli.vmspawnctl")
    allowed = reached("vmspawnd.interface") | reached("vmspawnd.options") | reached("vmspawnd.cli") | {
        "vmspawnd.cli.vmspawnctl", "vmspawnd.ptyfwd", "vmspawnd.qemu.vsock"}
    assert client <= allowed, sorted(client - allowed)
    daemon = {"vmspawnd.api", "vmspawnd.manager", "vmspawnd.machine", "vmspawnd.run", "vmspawnd.server",
              "vmspawnd.cli.vmspawnd", "vmspawnd.services.runner", "vmspawnd.systemd.machined", "vmspawnd.auth"}
    assert not allowed & daemon, sorted(allowed & daemon)
