# SPDX-License-Identifier: LGPL-2.1-or-later
"""``vmspawn --firmware=list|describe`` side by side with systemd-vmspawn 262 (Debian forky).

For every descriptor set (one or more layers, highest priority first; see tests/peer/peer.py)
both programs run with the set as the only descriptors they see, and for each variant:

* ``list`` -- ``--firmware=list``: the printed paths, mapped back to (layer, file name), must be
  equal on both sides and equal to the merged list computed from the files on disk;
* ``describe*`` / ``feat-*`` / ``sb-*`` -- ``--firmware=describe`` with options: both fail (same
  exit code), or both print the same JSON (parsed), which must be that of a visible file on disk;
* ``features-list`` -- ``--firmware-features=list``: the same lines.

Some sets also state which file the issue's rule picks ("the first matching descriptor without
enrolled-keys; the non-secure-boot one with --secure-boot=no"), checked against the peer.

Crafted descriptors name firmware files under /nonexistent: neither side checks that they exist.

Run with ``make test-peer`` (root). A known difference of ours is marked ``xfail(strict=True)``
in :data:`KNOWN_DIFFERENCES`, so that the suite stays green while it exists and turns red (XPASS)
once fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.peer import peer
from tests.peer.peer import MASK, Directory, Layers, Result, Symlink

pytestmark = pytest.mark.peer

# --------------------------------------------------------------------------- descriptors

NOWHERE = "/nonexistent/vmspawnd-peer"  # firmware files need not exist for list/describe


def fw(description: str, *, features: tuple[str, ...] = (), arch: str = "x86_64",
       machines: tuple[str, ...] = ("pc-q35-*",), interface: tuple[str, ...] = ("uefi",),
       mapping: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A well-formed descriptor; the description tells the files apart."""
    slug = description.replace(" ", "-")
    return {
        "description": description,
        "interface-types": list(interface),
        "mapping": mapping or {
            "device": "flash",
            "executable": {"filename": f"{NOWHERE}/{slug}_CODE.fd", "format": "raw"},
            "nvram-template": {"filename": f"{NOWHERE}/{slug}_VARS.fd", "format": "raw"},
        },
        "targets": [{"architecture": arch, "machines": list(machines)}],
        "features": list(features),
        "tags": [],
        **extra,
    }


def without(data: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of ``data`` with the key at ``path`` removed."""
    copy = json.loads(json.dumps(data))
    node = copy
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return copy


ENROLLED = fw("enrolled", features=("secure-boot", "enrolled-keys", "requires-smm", "amd-sev"))
SECURE = fw("secure", features=("secure-boot", "requires-smm"))
SEV = fw("sev", features=("amd-sev", "acpi-s3"))
PLAIN = fw("plain", features=("acpi-s3",))
FALLBACK = fw("fallback", features=("acpi-s3",))

# --------------------------------------------------------------------------- variants

D = "--firmware=describe"
BASIC: dict[str, list[str]] = {
    "list": ["--firmware=list"],
    "features-list": ["--firmware-features=list"],
    "describe": [D],
    "describe-sb-no": [D, "--secure-boot=no"],
    "describe-sb-yes": [D, "--secure-boot=yes"],
    "feat-not-sb": [D, "--firmware-features=~secure-boot"],
    "feat-amd-sev": [D, "--firmware-features=amd-sev"],
}
EXTRA: dict[str, list[str]] = {
    "feat-enrolled": [D, "--firmware-features=enrolled-keys"],
    "feat-empty": [D, "--firmware-features="],
    "feat-multi": [D, "--firmware-features=amd-sev", "--firmware-features=~secure-boot"],
    "feat-comma": [D, "--firmware-features=amd-sev,~secure-boot"],
    "feat-sb-and-sb-no": [D, "--firmware-features=secure-boot", "--secure-boot=no"],
    "feat-reset": [D, "--firmware-features=enrolled-keys", "--firmware-features="],
    "feat-sev-not-sev": [D, "--firmware-features=amd-sev", "--firmware-features=~amd-sev"],
    # --secure-boot= and --firmware-features= interact in command-line order in 262
    "sb-no-then-feat-sb": [D, "--secure-boot=no", "--firmware-features=secure-boot"],
    "sb-no-then-auto": [D, "--secure-boot=no", "--secure-boot=auto"],
    "sb-yes-then-no": [D, "--secure-boot=yes", "--secure-boot=no"],
    "sb-no-then-reset": [D, "--secure-boot=no", "--firmware-features="],
}
EDGE = {k: BASIC[k] for k in ("list", "describe")}
ALL = {**BASIC, **EXTRA}


@dataclass
class DescriptorSet:
    name: str
    #: layers, highest priority first; None: filled in at run time (real descriptors)
    layers: list[dict[str, peer.Entry]] | None
    variants: dict[str, list[str]] = field(default_factory=lambda: dict(BASIC))
    #: variant -> file name the peer must pick (None: no descriptor matches, exit != 0)
    expect: dict[str, str | None] = field(default_factory=dict)


def edge(name: str, entry: peer.Entry, expect: str | None = None) -> DescriptorSet:
    """``10-edge.json`` (the case) before a plain ``90-fallback.json``; describe tells whether the
    edge file is accepted."""
    exp = {"describe": expect} if expect is not None else {}
    return DescriptorSet(f"edge-{name}", [{"10-edge.json": entry, "90-fallback.json": FALLBACK}], EDGE, exp)


SETS: list[DescriptorSet] = [
    # (a) and (b): the real descriptors, read when the tests run
    DescriptorSet("bookworm-host", None, ALL, {
        "describe": "50-edk2-x86_64-secure.json",
        "describe-sb-no": "60-edk2-x86_64.json",
    }),
    DescriptorSet("forky-tree", None, ALL, {
        "describe": "50-edk2-x86_64-secure.json",
        "describe-sb-no": "60-edk2-x86_64.json",
    }),
    # (c) crafted sets
    DescriptorSet("empty", [{}], BASIC, {"describe": None, "describe-sb-no": None}),
    DescriptorSet("enrolled-first", [{"10-enrolled.json": ENROLLED, "20-secure.json": SECURE,
                                      "30-plain.json": PLAIN}], ALL, {
        "describe": "20-secure.json", "describe-sb-no": "30-plain.json", "describe-sb-yes": "20-secure.json",
        "feat-not-sb": "30-plain.json", "feat-enrolled": "10-enrolled.json", "feat-empty": "10-enrolled.json",
    }),
    DescriptorSet("secure-boot-only", [{"10-enrolled.json": ENROLLED, "20-secure.json": SECURE}], ALL, {
        "describe": "20-secure.json", "describe-sb-no": None, "feat-not-sb": None,
    }),
    DescriptorSet("features", [{"10-enrolled.json": ENROLLED, "20-secure.json": SECURE, "30-sev.json": SEV,
                                "40-plain.json": PLAIN}], ALL, {
        "describe": "20-secure.json", "describe-sb-no": "30-sev.json", "feat-not-sb": "30-sev.json",
        "feat-amd-sev": "30-sev.json", "feat-enrolled": "10-enrolled.json",
        "feat-multi": "30-sev.json", "feat-comma": "30-sev.json",
    }),
    DescriptorSet("malformed-among-good", [{
        "10-syntax.json": '{"description": "broken", ',
        "11-not-object.json": "[]",
        "12-no-tags.json": without(fw("no tags", features=("secure-boot",)), "tags"),
        "13-features-string.json": {**fw("features string"), "features": "secure-boot"},
        "14-unknown-device.json": fw("unknown device", mapping={"device": "disk", "filename": f"{NOWHERE}/x"}),
        "15-no-format.json": without(fw("no format"), "mapping", "executable", "format"),
        "16-no-targets.json": without(fw("no targets"), "targets"),
        "17-binary.json": b"\xff\xfe\x00garbage",
        "20-secure.json": SECURE,
        "30-plain.json": PLAIN,
    }], ALL, {"describe": "20-secure.json", "describe-sb-no": "30-plain.json"}),
    DescriptorSet("masked", [
        {"20-secure.json": MASK, "40-devnull.json": Symlink("/dev/null"),
         "30-plain.json": fw("override", features=("acpi-s3",)), "README": b"not a descriptor\n"},
        {"20-secure.json": SECURE, "30-plain.json": PLAIN,
         "40-devnull.json": fw("devnull", features=("secure-boot",)),
         "50-low.json": fw("low", features=("secure-boot",))},
    ], ALL, {"describe": "30-plain.json", "describe-sb-yes": "50-low.json"}),
    DescriptorSet("three-layers", [
        {"10-a.json": MASK},
        {"10-a.json": fw("a1"), "20-b.json": fw("b1")},
        {"10-a.json": fw("a2"), "20-b.json": fw("b2"), "30-c.json": fw("c2"), "40-d.json": fw("d2")},
    ], BASIC, {"describe": "20-b.json"}),
    DescriptorSet("other-arch-first", [{
        "10-aarch64.json": fw("aarch64", arch="aarch64", machines=("virt-*",)),
        "15-i440fx.json": fw("i440fx only", machines=("pc-i440fx-*",)),
        "17-no-uefi.json": fw("bios only", interface=("bios",)),
        "20-plain.json": PLAIN,
    }], BASIC, {"describe": "20-plain.json"}),
    DescriptorSet("sort-order", [{
        "9-b.json": fw("nine"), "10-a.json": fw("ten"), "A.json": fw("upper a"), "a.json": fw("lower a"),
        "_x.json": fw("underscore"), "Z.json": fw("upper z"), "10-a.JSON": fw("upper suffix"),
        "10-a.json~": fw("backup"), "10-a.json.dpkg-old": fw("dpkg old"), "Ä.json": fw("umlaut"),
    }], EDGE, {"describe": "10-a.json"}),
    DescriptorSet("edge-hidden", [{".10-edge.json": fw("hidden"), "90-fallback.json": FALLBACK}], EDGE,
                  {"describe": "90-fallback.json"}),
    edge("relative-path", fw("relative", mapping={
        "device": "flash", "executable": {"filename": "OVMF_CODE.fd", "format": "raw"},
        "nvram-template": {"filename": "OVMF_VARS.fd", "format": "raw"}})),
    edge("duplicate-key", '{"description": "dup", "description": "dup2", "interface-types": ["uefi"], '
                          '"mapping": {"device": "flash", "executable": {"filename": "/x/C.fd", "format": "raw"}, '
                          '"nvram-template": {"filename": "/x/V.fd", "format": "raw"}}, '
                          '"targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}], '
                          '"features": [], "tags": []}'),
    edge("memory-device", fw("memory", mapping={"device": "memory", "filename": f"{NOWHERE}/OVMF.fd"}),
         "90-fallback.json"),
    edge("stateless", fw("stateless", mapping={
        "device": "flash", "mode": "stateless", "executable": {"filename": f"{NOWHERE}/C.fd", "format": "raw"}}),
        "90-fallback.json"),
    edge("combined", fw("combined", mapping={
        "device": "flash", "mode": "combined", "executable": {"filename": f"{NOWHERE}/C.fd", "format": "raw"},
        "nvram-template": {"filename": f"{NOWHERE}/V.fd", "format": "raw"}})),
    edge("qcow2", fw("qcow2", mapping={
        "device": "flash", "executable": {"filename": f"{NOWHERE}/C.qcow2", "format": "qcow2"},
        "nvram-template": {"filename": f"{NOWHERE}/V.qcow2", "format": "qcow2"}}), "10-edge.json"),
    edge("machine-exact", fw("machine exact", machines=("pc-q35-9.2",)), "10-edge.json"),
    edge("no-machines", fw("no machines", machines=()), "90-fallback.json"),
    edge("tags-mixed", {**fw("tags mixed"), "tags": [1, "x", {"y": None}]}),
    edge("extra-keys", {**fw("extra keys"), "x-vendor": {"anything": [1, 2.5, None]}}, "10-edge.json"),
    edge("features-not-strings", {**fw("features numbers"), "features": [1, 2]}, "90-fallback.json"),
    edge("interface-not-strings", {**fw("interface numbers"), "interface-types": ["uefi", 7]}),
    edge("description-not-string", {**fw("desc"), "description": 42}),
    edge("symlink", Symlink("90-fallback.json")),
    edge("dangling-symlink", Symlink(f"{NOWHERE}/gone.json")),
    edge("directory", Directory()),
    DescriptorSet("edge-directory-over-file", [{"10-edge.json": Directory()},
                                               {"10-edge.json": fw("file below dir"), "90-fallback.json": FALLBACK}],
                  EDGE),
    DescriptorSet("edge-lone-mask", [{"05-empty.json": MASK, "90-fallback.json": FALLBACK}], EDGE,
                  {"describe": "90-fallback.json"}),
]

_OPTION_SETS = ("bookworm-host", "forky-tree", "enrolled-first", "secure-boot-only", "features",
                "malformed-among-good")

#: (set, variant) -> why ours differs from 262 (xfail, strict: an XPASS means it was fixed).
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    # none at the moment: the order of --secure-boot/--firmware-features, hidden files, dangling
    # links, relative firmware paths and duplicate JSON keys now all match 262
}


def _params() -> list:
    out = []
    for s in SETS:
        for variant in s.variants:
            marks = []
            if (s.name, variant) in KNOWN_DIFFERENCES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[(s.name, variant)]))
            out.append(pytest.param(s, variant, id=f"{s.name}:{variant}", marks=marks))
    return out


# --------------------------------------------------------------------------- running

@dataclass
class SetRun:
    layers: Layers
    peer: dict[str, Result]
    ours: dict[str, Result]


@pytest.fixture(scope="session")
def peer_tree() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the peer comparison needs root (mmdebstrap, mount namespace, chroot)")
    try:
        return peer.build_tree()
    except peer.PeerUnavailable as e:
        pytest.skip(f"no systemd-vmspawn peer: {e}")


def _real_layers(name: str, tree: Path) -> list[dict[str, peer.Entry]]:
    if name == "bookworm-host":
        src = Path("/usr/share/qemu/firmware")
        if not src.is_dir() or not any(src.glob("*.json")):
            pytest.skip("no descriptors in /usr/share/qemu/firmware on this host (ovmf not installed)")
        return [{p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}]
    return [peer.own_descriptors(tree)]


@pytest.fixture(scope="session")
def runs(peer_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, SetRun] = {}

    def get(s: DescriptorSet) -> SetRun:
        if s.name not in cache:
            layers = Layers.create(tmp_path_factory.mktemp("peer") / s.name,
                                   s.layers if s.layers is not None else _real_layers(s.name, peer_tree))
            names = list(s.variants)
            argvs = [s.variants[n] for n in names]
            peer_results = peer.run_peer(peer_tree, layers, argvs)
            ours_results = peer.run_ours(layers, argvs)
            cache[s.name] = SetRun(layers, dict(zip(names, peer_results, strict=True)),
                                   dict(zip(names, ours_results, strict=True)))
        return cache[s.name]

    return get


# --------------------------------------------------------------------------- comparing

def _show(side: str, r: Result) -> str:
    return (f"  {side}: exit {r.returncode}\n    stdout: {r.stdout.strip()[:1500]!r}\n"
            f"    stderr: {r.stderr.strip()[-1500:]!r}")


def _located_list(layers: Layers, r: Result, side: str) -> list:
    return [layers.locate(line, side) for line in r.stdout.splitlines() if line.strip()]


def _on_disk(layers: Layers) -> list[tuple[tuple[int, str], Any]]:
    found = []
    for where in layers.visible():
        try:
            found.append((where, json.loads(layers.read(where))))
        except ValueError:
            continue
    return found


def _described(layers: Layers, r: Result) -> tuple[str, Any, tuple[int, str] | None]:
    """("error", stderr-ish, None) or ("picked", parsed JSON, (layer, name) of the file on disk
    with that content, or None if no visible file has it)."""
    if r.returncode != 0:
        return ("error", None, None)
    data = json.loads(r.stdout)
    where = next((w for w, d in _on_disk(layers) if d == data), None)
    return ("picked", data, where)


@pytest.mark.parametrize(("dset", "variant"), _params())
def test_firmware_peer(dset: DescriptorSet, variant: str, runs) -> None:
    run = runs(dset)
    p, o = run.peer[variant], run.ours[variant]
    detail = f"{dset.name} {' '.join(p.argv)}\n{_show('262', p)}\n{_show('ours', o)}"

    if variant == "list":
        assert p.returncode == 0, f"the peer failed to list\n{detail}"
        peer_list, ours_list = _located_list(run.layers, p, "peer"), _located_list(run.layers, o, "ours")
        assert peer_list == run.layers.visible(), \
            f"262's list is not the merged list on disk (harness or spec assumption wrong)\n" \
            f"  on disk: {run.layers.visible()}\n  262:     {peer_list}\n{detail}"
        assert (o.returncode, ours_list) == (0, peer_list), \
            f"--firmware=list differs\n  262:  {peer_list}\n  ours: {ours_list}\n{detail}"
        return

    if variant == "features-list":
        assert (o.returncode, o.stdout.split()) == (p.returncode, p.stdout.split()), \
            f"--firmware-features=list differs\n{detail}"
        return

    peer_kind, peer_data, peer_where = _described(run.layers, p)
    if peer_kind == "picked":
        assert peer_where is not None, f"262 printed JSON that no visible descriptor on disk has\n{detail}"
    if variant in dset.expect:
        want = dset.expect[variant]
        got = peer_where[1] if peer_where else None
        assert got == want, f"262 picked {got}, our selection rule (qemu/firmware.py: rejection) says {want}\n{detail}"

    ours_kind, ours_data, ours_where = _described(run.layers, o)
    if peer_kind == "error":
        assert ours_kind == "error", f"262 finds no descriptor, ours picks {ours_where}\n{detail}"
        assert o.returncode == p.returncode, f"both fail, with different exit codes\n{detail}"
        return
    assert ours_kind == "picked", f"262 picks {peer_where}, ours fails\n{detail}"
    assert ours_where == peer_where and ours_data == peer_data, \
        f"262 picks {peer_where}, ours picks {ours_where}\n{detail}"


def test_peer_is_expected_version(peer_tree: Path) -> None:
    """The comparisons are about 262; a newer forky systemd needs a look at KNOWN_DIFFERENCES."""
    version = peer.tree_info(peer_tree)["versions"]["systemd-container"] or ""
    assert version.split("-")[0].split(".")[0] == peer.EXPECTED_SYSTEMD, \
        f"forky's systemd-container is {version}, the tests expect {peer.EXPECTED_SYSTEMD}"
