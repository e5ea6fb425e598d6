# SPDX-License-Identifier: LGPL-2.1-or-later
"""The upstream peer: systemd-vmspawn 262 from Debian forky, run side by side with our vmspawn.

Only ``--firmware=list``, ``--firmware=describe`` and ``--firmware-features=list`` are compared,
so the peer needs no VM plumbing at all:

1. A minimal forky tree (``mmdebstrap --variant=minbase --include=systemd-container,ovmf``) is built
   once and cached under ``${VMSPAWND_CACHE:-~/.cache/vmspawnd}/peer-tree/<key>``; the key hashes
   every input (suite, packages, apt/dpkg options, :data:`PEER_VERSION`). It is built in a
   temporary directory and renamed into place, under a lock; a killed build leaves a
   ``.tmp-<key>-<pid>`` directory that the next build removes. Older keys are pruned after a
   successful build. ``systemd-container`` brings ``systemd-vmspawn`` (and ``systemd``);
   ``ovmf`` is there only as the source of forky's own descriptors (the peer needs no firmware
   file to exist for these options -- it never looks at them).
2. :func:`run_peer` runs ``systemd-vmspawn ARGS`` in a plain ``chroot`` of that tree, inside a
   private mount namespace (``unshare --mount --propagation private``) where a tmpfs covers the
   tree's ``/run`` and ``/tmp`` and a test's descriptor layers are bound read-only (see
   :class:`Layers`). Found by experiment, 262 needs nothing else for these options: no ``/proc``,
   no D-Bus, no cgroup, not even ``$HOME`` (root's comes from the tree's passwd); and it never
   looks at the firmware files a descriptor names (descriptors pointing at ``/nonexistent/...``
   are listed and selected), so no placeholder files are needed. The cached tree is never
   written to at run time; every mount dies with the namespace.
3. :func:`run_ours` runs the project's ``vmspawn`` on the host with the same layers as the only
   descriptors it sees (its ``$XDG_*`` dirs point at them; whatever the host has in
   ``/etc/qemu/firmware`` and ``/usr/share/qemu/firmware`` is masked by empty files of the same
   name in its ``$XDG_CONFIG_HOME``, the highest-priority directory).

Descriptor layers, highest priority first, map onto the search path of both sides like this::

    layer      peer (in the chroot)                            ours (on the host)
    masks      -                                               $XDG_CONFIG_HOME/qemu/firmware
    0 .. n-2   $XDG_DATA_HOME, $XDG_DATA_DIRS (+ /qemu/firmware)   $XDG_DATA_HOME, $XDG_DATA_DIRS
    n-1        /usr/share/qemu/firmware (bind mount)           the last $XDG_DATA_DIRS entry

Both print absolute paths; :meth:`Layers.locate` maps a printed path back to (layer, file name)
so that the two outputs compare exactly, including which layer a file was taken from.

Command line (root)::

    python -m tests.peer.peer build                       # build/refresh the cached tree
    python -m tests.peer.peer run [-L DIR]... -- ARGS...  # systemd-vmspawn ARGS with layers DIR...
                                                          # (default: forky's own descriptors)
    python -m tests.peer.peer clean                       # remove every cached peer tree

Only the standard library is used (plus small helpers of ``tests.systemd.container``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.systemd.container import (
    APT_OPTIONS,
    DPKG_OPTIONS,
    HarnessError,
    build_atomically,
    cache_root,
    file_lock,
    remove_tree,
    repo_root,
    run_child,
)

#: Bump when the way the tree is made or used changes: part of the cache key.
PEER_VERSION = "1"
SUITE = "forky"
#: systemd-container ships systemd-vmspawn (and pulls systemd); ovmf only for its descriptors.
PACKAGES: tuple[str, ...] = ("systemd-container", "ovmf")
#: The upstream version these comparisons are about.
EXPECTED_SYSTEMD = "262"

TREE_MARKER = "etc/vmspawnd-peer-tree.json"
VMSPAWN_INSIDE = "/usr/bin/systemd-vmspawn"
FIRMWARE_DIR = "usr/share/qemu/firmware"
#: Where a test's layers appear inside the chroot (below the tmpfs put over /run).
LAYERS_INSIDE = "/run/vmspawnd-peer"
#: Host dirs our vmspawn always searches (qemu/firmware.py) and that the tests cannot change: masked.
HOST_FIRMWARE_DIRS: tuple[Path, ...] = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
#: Dirs inside the tree the peer would search besides the layers; covered by empty tmpfs if present.
TREE_EXTRA_DIRS: tuple[str, ...] = ("etc/qemu/firmware", "usr/local/share/qemu/firmware",
                                    "root/.config/qemu/firmware", "root/.local/share/qemu/firmware")
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUN_TIMEOUT = 60.0


def _log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


class PeerUnavailable(HarnessError):
    """The peer cannot be had here (not root, no mmdebstrap, the build failed); tests skip."""


# --------------------------------------------------------------------------- the tree

def tree_inputs() -> dict:
    return {"peer": PEER_VERSION, "suite": SUITE, "packages": sorted(PACKAGES),
            "apt": list(APT_OPTIONS), "dpkg": list(DPKG_OPTIONS)}


def tree_key() -> str:
    digest = hashlib.sha256(json.dumps(tree_inputs(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{SUITE}-{digest}"


def tree_path(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "peer-tree" / tree_key()


def tree_ready(tree: Path) -> bool:
    return (tree / TREE_MARKER).is_file() and (tree / VMSPAWN_INSIDE.lstrip("/")).is_file()


def tree_info(tree: Path) -> dict:
    """The marker written at build time: inputs, package versions, build time."""
    return json.loads((tree / TREE_MARKER).read_text())


def mmdebstrap_argv(target: Path) -> list[str]:
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet", f"--include={','.join(PACKAGES)}"]
    argv += [f"--aptopt={o}" for o in APT_OPTIONS]
    argv += [f"--dpkgopt={o}" for o in DPKG_OPTIONS]
    return [*argv, SUITE, str(target)]


def dpkg_versions(root: Path, packages: Iterable[str]) -> dict[str, str | None]:
    """Installed versions read from ``var/lib/dpkg/status`` (no chroot needed)."""
    wanted = set(packages)
    found: dict[str, str | None] = dict.fromkeys(sorted(wanted))
    for stanza in (root / "var/lib/dpkg/status").read_text(errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in wanted and fields.get("Status", "").endswith(" installed"):
            found[fields["Package"]] = fields.get("Version")
    return found


def _finish_tree(root: Path) -> None:
    (root / FIRMWARE_DIR).mkdir(parents=True, exist_ok=True)
    for rel in ("run", "tmp"):
        (root / rel).mkdir(exist_ok=True)
    versions = dpkg_versions(root, ("systemd", "systemd-container", "ovmf"))
    if not versions.get("systemd-container"):
        raise PeerUnavailable("the tree has no systemd-container package")
    info = {**tree_inputs(), "versions": versions, "built": time.time()}
    (root / TREE_MARKER).write_text(json.dumps(info, indent=1) + "\n")


def build_tree(cache: Path | None = None, log=_log) -> Path:
    """The cached tree, built first if needed (temp dir + rename, under a lock)."""
    final = tree_path(cache)
    if tree_ready(final):
        return final
    if os.geteuid() != 0:
        raise PeerUnavailable("building the forky peer tree needs root (mmdebstrap --mode=root)")
    if shutil.which("mmdebstrap") is None or shutil.which("unshare") is None:
        raise PeerUnavailable("mmdebstrap/unshare missing on the host (apt-get install mmdebstrap util-linux)")
    build_log = final.parent / f"{final.name}.build.log"

    def make(tmp: Path) -> None:
        log(f"building the {SUITE} peer tree ({', '.join(PACKAGES)}) -> {final}")
        with open(build_log, "wb") as out:
            # private mount namespace: whatever mmdebstrap mounts dies with it, even on SIGKILL
            rc = run_child(["unshare", "--mount", "--propagation", "private", "--", *mmdebstrap_argv(tmp)],
                           stdout=out)
        if rc != 0:
            tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-15:])
            raise PeerUnavailable(f"mmdebstrap {SUITE} failed (exit {rc}; network?); {build_log}:\n{tail}")
        _finish_tree(tmp)

    t0 = time.monotonic()
    if build_atomically(final, tree_ready, make, log):
        log(f"peer tree built in {time.monotonic() - t0:.1f}s: {tree_info(final)['versions']}")
    prune_trees(keep=final, cache=cache, log=log)
    return final


def prune_trees(keep: Path | None = None, cache: Path | None = None, log=_log) -> list[Path]:
    """Remove cached peer trees other than ``keep`` (each under its own lock)."""
    base = (cache or cache_root()) / "peer-tree"
    removed = []
    for tree in sorted(base.glob(f"{SUITE}-*")) if base.is_dir() else []:
        if not tree.is_dir() or (keep is not None and tree == keep):
            continue
        with file_lock(base / f"{tree.name}.lock"):
            log(f"removing old peer tree {tree}")
            remove_tree(tree)
        removed.append(tree)
        for leftover in (base / f"{tree.name}.lock", base / f"{tree.name}.build.log"):
            leftover.unlink(missing_ok=True)
    return removed


def own_descriptors(tree: Path) -> dict[str, bytes]:
    """The tree's own (forky ovmf) descriptors, as they are on disk."""
    d = tree / FIRMWARE_DIR
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- descriptor layers

@dataclass(frozen=True)
class Symlink:
    """A layer entry that is a symbolic link (``Symlink("/dev/null")`` masks)."""

    target: str


@dataclass(frozen=True)
class Directory:
    """A layer entry that is a directory (named like a descriptor)."""


#: An entry: file content (bytes/str, or a JSON value to dump), a symlink or a directory.
Entry = bytes | str | dict | list | Symlink | Directory
MASK = b""  # an empty file masks the same name in lower layers


def _write_entry(path: Path, entry: Entry) -> None:
    if isinstance(entry, Symlink):
        path.symlink_to(entry.target)
    elif isinstance(entry, Directory):
        path.mkdir()
    elif isinstance(entry, bytes):
        path.write_bytes(entry)
    elif isinstance(entry, str):
        path.write_text(entry)
    else:
        path.write_text(json.dumps(entry, indent=2) + "\n")


@dataclass
class Layers:
    """Descriptor directories, highest priority first, written below ``root``.

    ``root/L<i>/qemu/firmware`` holds layer i (shared by both sides); ``root/ours-config`` the
    masks for our side; ``root/empty`` is an existing empty directory used where an XDG variable
    must name *something* (an unset or empty variable would fall back to a default).
    """

    root: Path
    count: int

    @classmethod
    def create(cls, root: Path, layers: Sequence[Mapping[str, Entry]]) -> Layers:
        if not layers:
            layers = [{}]
        root.mkdir(parents=True, exist_ok=True)
        for i, layer in enumerate(layers):
            d = root / f"L{i}" / "qemu" / "firmware"
            d.mkdir(parents=True)
            for name, entry in layer.items():
                _write_entry(d / name, entry)
        (root / "empty").mkdir()
        self = cls(root, len(layers))
        self._write_masks(layers)
        # the peer runs as root in the chroot but everything must be readable anyway
        os.chmod(root, 0o755)
        return self

    def dir(self, i: int) -> Path:
        return self.root / f"L{i}" / "qemu" / "firmware"

    # ---- our side

    @property
    def ours_config(self) -> Path:
        return self.root / "ours-config"

    def _write_masks(self, layers: Sequence[Mapping[str, Entry]]) -> None:
        d = self.ours_config / "qemu" / "firmware"
        d.mkdir(parents=True)
        named = {name for layer in layers for name in layer}
        with contextlib.suppress(OSError):
            # /etc/qemu/firmware ranks above $XDG_DATA_*: a name there that a layer also has
            # cannot be masked without hiding the layer's file too
            clash = sorted(named & {e.name for e in Path("/etc/qemu/firmware").iterdir()})
            if clash:
                raise PeerUnavailable(f"/etc/qemu/firmware on this host has {clash}, which the test layers "
                                      "use too: our side cannot be isolated from them")
        for host_dir in HOST_FIRMWARE_DIRS:
            with contextlib.suppress(OSError):
                for entry in host_dir.iterdir():
                    if entry.name not in named and not (d / entry.name).exists():
                        (d / entry.name).write_bytes(MASK)

    def ours_env(self) -> dict[str, str]:
        data = [str(self.root / f"L{i}") for i in range(self.count)]
        return {
            "HOME": str(self.root / "empty"),
            "XDG_CONFIG_HOME": str(self.ours_config),
            "XDG_DATA_HOME": data[0],
            "XDG_DATA_DIRS": ":".join(data[1:]) or str(self.root / "empty"),
        }

    # ---- the peer's side

    def peer_env(self) -> dict[str, str]:
        upper = [f"{LAYERS_INSIDE}/L{i}" for i in range(self.count - 1)]
        empty = f"{LAYERS_INSIDE}/empty"
        return {
            "HOME": "/root",
            "XDG_CONFIG_HOME": empty,
            "XDG_DATA_HOME": upper[0] if upper else empty,
            "XDG_DATA_DIRS": ":".join(upper[1:]) or empty,
        }

    # ---- mapping printed paths back

    def locate(self, printed: str, side: str) -> tuple[int, str] | str:
        """(layer, file name) of a path printed by ``side`` ("peer"/"ours"), or the path itself
        when it lies in none of the layers (a descriptor that should not have been visible)."""
        p = Path(printed)
        if side == "peer":
            dirs = {Path(LAYERS_INSIDE) / f"L{i}" / "qemu" / "firmware": i for i in range(self.count - 1)}
            dirs[Path("/") / FIRMWARE_DIR] = self.count - 1
        else:
            dirs = {self.dir(i): i for i in range(self.count)}
        return (dirs[p.parent], p.name) if p.parent in dirs else printed

    def visible(self) -> list[tuple[int, str]]:
        """The expected merged list of the search path: first layer having a name wins; empty files
        and links to /dev/null mask; only regular *.json files (links followed) count, hidden ones
        (".name.json") not (systemd's conf-files rules); by file name."""
        chosen: dict[str, tuple[int, str] | None] = {}
        for i in range(self.count):
            for entry in self.dir(i).iterdir():
                if not entry.name.endswith(".json") or entry.name.startswith(".") or entry.name in chosen:
                    continue
                if entry.is_symlink() and os.readlink(entry) == "/dev/null":
                    chosen[entry.name] = None
                elif entry.is_file():
                    chosen[entry.name] = None if entry.stat().st_size == 0 else (i, entry.name)
        return [v for _, v in sorted(chosen.items()) if v is not None]

    def read(self, where: tuple[int, str]) -> bytes:
        return (self.dir(where[0]) / where[1]).read_bytes()


@contextlib.contextmanager
def layers_dir(layers: Sequence[Mapping[str, Entry]], parent: Path | None = None) -> Iterator[Layers]:
    """:class:`Layers` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vmspawnd-peer-", dir=parent) as tmp:
        yield Layers.create(Path(tmp) / "set", layers)


# --------------------------------------------------------------------------- running both sides

@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_peer(tree: Path, layers: Layers, args_list: Sequence[Sequence[str]], *,
             debug: bool = True, timeout: float = RUN_TIMEOUT) -> list[Result]:
    """Run ``systemd-vmspawn ARGS`` in the tree for each ARGS, all in one private mount namespace
    with ``layers`` as the only descriptors. ``debug`` sets SYSTEMD_LOG_LEVEL=debug (reasons for
    skipping descriptors land in stderr; stdout is unaffected)."""
    if os.geteuid() != 0:
        raise PeerUnavailable("running the peer needs root (mount namespace, chroot)")
    request = {"tree": str(tree), "layers": str(layers.root), "count": layers.count,
               "env": {**layers.peer_env(), **({"SYSTEMD_LOG_LEVEL": "debug"} if debug else {})},
               "runs": [list(a) for a in args_list], "timeout": timeout}
    with file_lock(tree.parent / f"{tree.name}.lock", exclusive=False):
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "tests.peer.peer", "_inside", json.dumps(request)],
            cwd=repo_root(), capture_output=True, text=True, timeout=timeout * (len(args_list) + 1),
            stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise HarnessError(f"peer helper failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return [Result(tuple(r["argv"]), r["rc"], r["stdout"], r["stderr"]) for r in json.loads(proc.stdout)]


def _inside(request: dict) -> list[dict]:
    """In the private mount namespace (as the helper process): mount, then run each command in
    the chroot. Every mount dies with the namespace; the tree itself is not written to."""
    tree, layers, count = Path(request["tree"]), Path(request["layers"]), request["count"]

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True, stdin=subprocess.DEVNULL)

    mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "peer-run", str(tree / "run"))
    mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "peer-tmp", str(tree / "tmp"))
    inside = tree / LAYERS_INSIDE.lstrip("/")
    inside.mkdir()
    mount("--bind", "-o", "ro", str(layers), str(inside))
    mount("--bind", "-o", "ro", str(layers / f"L{count - 1}" / "qemu" / "firmware"), str(tree / FIRMWARE_DIR))
    for rel in TREE_EXTRA_DIRS:
        if (tree / rel).is_dir():
            mount("-t", "tmpfs", "-o", "ro,mode=0755", "peer-empty", str(tree / rel))
    env = {"PATH": PATH_INSIDE, "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat",
           **request["env"]}
    results = []
    for args in request["runs"]:
        argv = ["chroot", str(tree), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                VMSPAWN_INSIDE, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=request["timeout"],
                              stdin=subprocess.DEVNULL, cwd="/")
        results.append({"argv": args, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
    return results


def ours_binary() -> Path:
    return repo_root() / ".venv" / "bin" / "vmspawn"


def run_ours(layers: Layers, args_list: Sequence[Sequence[str]], *, timeout: float = RUN_TIMEOUT) -> list[Result]:
    """Run the project's ``vmspawn ARGS`` on the host for each ARGS with ``layers`` (and nothing
    else) visible."""
    binary = ours_binary()
    if not binary.exists():
        raise PeerUnavailable(f"{binary} missing (run make setup)")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
           **layers.ours_env()}
    results = []
    for args in args_list:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=layers.root)
        results.append(Result(tuple(args), proc.returncode, proc.stdout, proc.stderr))
    return results


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peer.peer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached forky tree")
    run = sub.add_parser("run", help="run systemd-vmspawn ARGS in the tree")
    run.add_argument("-L", "--layer", action="append", type=Path, default=[],
                     help="a descriptor directory (repeat: highest priority first); "
                          "default: the tree's own descriptors")
    run.add_argument("--ours", action="store_true", help="also run our vmspawn with the same layers")
    run.add_argument("args", nargs="*")
    sub.add_parser("clean", help="remove every cached peer tree")
    inside = sub.add_parser("_inside")
    inside.add_argument("request")
    ns = parser.parse_args(argv)

    if ns.cmd == "_inside":
        json.dump(_inside(json.loads(ns.request)), sys.stdout)
        return 0
    try:
        if ns.cmd == "clean":
            for p in prune_trees():
                print(p)
            return 0
        t0 = time.monotonic()
        tree = build_tree()
        if ns.cmd == "build":
            print(f"{tree}\t{json.dumps(tree_info(tree)['versions'])}\t{time.monotonic() - t0:.2f}s")
            return 0
        sources = ns.layer or [tree / FIRMWARE_DIR]
        layer_specs = [{p.name: (Symlink(os.readlink(p)) if p.is_symlink() else p.read_bytes())
                        for p in sorted(d.iterdir()) if p.is_file() or p.is_symlink()} for d in sources]
        with layers_dir(layer_specs) as layers:
            sides = [("peer", run_peer(tree, layers, [ns.args], debug=False))]
            if ns.ours:
                sides.append(("ours", run_ours(layers, [ns.args])))
        rc = 0
        for name, (res,) in sides:
            if len(sides) > 1:
                print(f"--- {name} (exit {res.returncode})")
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            rc = rc or res.returncode
        return rc
    except HarnessError as e:
        print(f"peer: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
