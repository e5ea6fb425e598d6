# SPDX-License-Identifier: LGPL-2.1-or-later
"""The man pages are made from the parsers: every option --help shows is in them, and groff is happy."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest

from vmspawnd.cli import vmspawnctl, vmspawnd
from vmspawnd.manpage import pages
from vmspawnd.options import vmspawn_parser

PARSERS = {"vmspawn.1": vmspawn_parser, "vmspawnctl.1": vmspawnctl.build_parser, "vmspawnd.8": vmspawnd.build_parser}


@pytest.mark.parametrize("page", sorted(PARSERS))
def test_every_visible_option_is_documented(page):
    text = pages()[page].replace("\\-", "-")
    for action in PARSERS[page]()._actions:
        if action.help == argparse.SUPPRESS:
            assert not any(f".B {o}" in text for o in action.option_strings)  # hidden aliases stay hidden
            continue
        for option in action.option_strings:
            assert option in text, (page, option)
    assert text.startswith(".TH ") and ".SH SEE ALSO" in text


def test_vmspawnctl_page_lists_the_commands():
    text = pages()["vmspawnctl.1"]
    for command in ("create", "start", "stop", "kill", "reboot", "pause", "resume", "remove", "status", "list",
                    "events", "console", "firmware"):
        assert f".B {command}\n" in text


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", sorted(PARSERS))
def test_groff_renders_it_without_warnings(page):
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=pages()[page], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    if page != "vmspawnd.8":  # escapes and non-ASCII survive
        shown = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=pages()[page], capture_output=True,
                               text=True, timeout=60).stdout
        assert "warning (the default), err…" in " ".join(shown.split()), shown
