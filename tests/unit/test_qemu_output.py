# SPDX-License-Identifier: LGPL-2.1-or-later
"""QEMU's output under the daemon (vmspawnd/qemu/output.py), with a writer in QEMU's place."""

from __future__ import annotations

import asyncio
import os

import pytest
from structlog.testing import capture_logs

from vmspawnd.log import get_logger
from vmspawnd.qemu.output import BURST, MAX_LINE, TAIL_LINES, QemuOutput


@pytest.mark.asyncio
async def test_each_line_is_one_entry_a_flood_is_cut_and_the_last_lines_are_kept() -> None:
    output = QemuOutput(get_logger().bind(machine="web"))
    qemu = os.dup(output.write_fd)  # (QEMU's copy)
    output.start()
    lines = [f"line {i}" for i in range(BURST + 50)]
    with capture_logs() as logs:
        os.write(qemu, ("\n".join(lines) + "\n" + "x" * (MAX_LINE + 10) + "\nno newline at the end").encode())
        os.close(qemu)  # QEMU exits
        await output.ended(5)
    said = [entry["output"] for entry in logs if entry["event"] == "QEMU's output"]
    assert said == lines[:BURST]  # one entry each, up to the burst
    dropped = [entry["dropped"] for entry in logs if entry["event"].startswith("QEMU wrote more")]
    assert dropped == [len(lines) - BURST + 3]  # said once, when QEMU ended
    assert list(output.last)[-3:] == ["x" * MAX_LINE, "x" * 10, "no newline at the end"]
    assert len(output.last) == TAIL_LINES
    output.close()


@pytest.mark.asyncio
async def test_closed_before_qemu_ran_it_leaves_no_descriptor() -> None:
    before = len(os.listdir("/proc/self/fd"))
    output = QemuOutput(get_logger())
    output.close()
    assert len(os.listdir("/proc/self/fd")) == before
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_what_qemu_wrote_last_is_logged_when_its_run_ends_before_it_was_read() -> None:
    output = QemuOutput(get_logger())
    qemu = os.dup(output.write_fd)
    output.start()
    with capture_logs() as logs:
        os.write(qemu, b"qemu-system-x86_64: terminating on signal 15 from pid 1\n")
        os.close(qemu)  # QEMU exits, and its run ends at once: the loop did not read the pipe yet
        output.close()
    said = [entry["output"] for entry in logs if entry["event"] == "QEMU's output"]
    assert said == ["qemu-system-x86_64: terminating on signal 15 from pid 1"]
