# SPDX-License-Identifier: LGPL-2.1-or-later
"""The journal gets each entry with its context as fields and the real place it was logged from."""

from __future__ import annotations

import structlog
from systemd import journal

from vmspawnd import messages
from vmspawnd.log import setup_logging


def test_journal_entries_carry_machine_message_id_and_the_callers_code_location(monkeypatch):
    sent: list[list[str]] = []  # what journal.send hands the journal, field by field (no journald here)
    monkeypatch.setattr(journal, "sendv", lambda *fields: sent.append(list(fields)))
    setup_logging(journal=True)
    try:
        structlog.get_logger().bind(machine="web").warning("VM failed", message_id=messages.FAILED, reason="x")
        line = test_journal_entries_carry_machine_message_id_and_the_callers_code_location.__code__.co_firstlineno + 5
    finally:
        setup_logging()
    (entry,) = sent
    fields = dict(field.split("=", 1) for field in entry)
    assert fields["MESSAGE"] == "VM failed machine=web reason=x"  # the id is a field, not text
    assert fields["MACHINE"] == "web" and fields["MESSAGE_ID"] == messages.FAILED and fields["PRIORITY"] == "4"
    assert fields["CODE_FILE"] == __file__ and fields["CODE_LINE"] == str(line)
    assert fields["CODE_FUNC"] == "test_journal_entries_carry_machine_message_id_and_the_callers_code_location"
