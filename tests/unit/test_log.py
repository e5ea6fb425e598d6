# SPDX-License-Identifier: LGPL-2.1-or-later
"""What our loggers print, and where: a command's plain lines at its level (structlog loaded only
for an event that passes it), and journal entries with their context as fields and the real place
each was logged from."""

from __future__ import annotations

import subprocess
import sys

from systemd import journal

from vmspawnd import messages
from vmspawnd.log import get_logger, setup_logging


def test_a_command_prints_what_reaches_its_level_and_loads_structlog_only_then() -> None:
    # in a fresh interpreter, as a command starts (the test process has structlog loaded already)
    code = """
import logging, sys
from vmspawnd.log import get_logger, setup_logging
setup_logging(program="vmspawn", level=logging.WARNING)
log = get_logger().bind(machine="web")
log.debug("not shown"); log.info("not shown either", x=1)
print("structlog" in sys.modules, flush=True)
log.warning("shown", reason="disk full")
try:
    1 / 0
except ZeroDivisionError:
    get_logger().exception("failed")
print("structlog" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"]
    first, second, *traceback = done.stderr.splitlines()
    assert first == "vmspawn: shown (machine=web reason=disk full)"
    assert second == "vmspawn: failed" and traceback[-1] == "ZeroDivisionError: division by zero"


def test_journal_entries_carry_machine_message_id_and_the_callers_code_location(monkeypatch):
    sent: list[list[str]] = []  # what journal.send hands the journal, field by field (no journald here)
    monkeypatch.setattr(journal, "sendv", lambda *fields: sent.append(list(fields)))
    setup_logging(journal=True)
    try:
        get_logger().bind(machine="web").warning("VM failed", message_id=messages.FAILED, reason="x")
        line = test_journal_entries_carry_machine_message_id_and_the_callers_code_location.__code__.co_firstlineno + 5
    finally:
        setup_logging()
    (entry,) = sent
    fields = dict(field.split("=", 1) for field in entry)
    assert fields["MESSAGE"] == "VM failed machine=web reason=x"  # the id is a field, not text
    assert fields["MACHINE"] == "web" and fields["MESSAGE_ID"] == messages.FAILED and fields["PRIORITY"] == "4"
    assert fields["CODE_FILE"] == __file__ and fields["CODE_LINE"] == str(line)
    assert fields["CODE_FUNC"] == "test_journal_entries_carry_machine_message_id_and_the_callers_code_location"


def test_our_first_event_does_not_undo_a_structlog_configuration_made_after_setup() -> None:
    # as in the test suite: structlog loaded, logging set up, then a test captures the events
    code = """
import logging, structlog
from structlog.testing import capture_logs
from vmspawnd.log import get_logger, setup_logging
setup_logging(program="vmspawn", level=logging.INFO)
with capture_logs() as logs:
    get_logger().bind(machine="web").info("started", pid=1)
print(logs)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[{'machine': 'web', 'pid': 1, 'event': 'started', 'log_level': 'info'}]"
    assert done.stderr == ""
