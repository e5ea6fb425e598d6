# SPDX-License-Identifier: LGPL-2.1-or-later
"""Console cosmetics: the background tint while a VM runs, and the terminal window title.

The tint keeps the guest's output visibly "inside" the VM: the background colour is set at
the start, after every line break and terminal reset, and re-applied wherever the guest's own
SGR sequences reset the background.
"""

from __future__ import annotations

import colorsys
import os
import re
import select
import termios
import time
import tty

from vmspawnd.errors import ConfigError

ESC = 0x1B
MAX_SEQUENCE = 192
_SPECIAL = re.compile(rb"[\x1b\n\r]")  # what the tinter looks at: escapes and line ends
_BACKGROUND_RE = re.compile(r"^[0-9;]+\Z")
TINT_HUE = 130


def validate_background(value: str) -> str:
    """``--background=`` takes an ANSI SGR parameter string (e.g. ``41``, ``48;2;0;64;0``); empty disables."""
    if value and not _BACKGROUND_RE.match(value):
        raise ConfigError("background", value, "expected SGR parameters such as 41 or 48;2;R;G;B (digits and ';')")
    return value


def tint_from_background(rgb: tuple[float, float, float]) -> str:
    """A green tint that suits a terminal with background ``rgb`` (components 0..1)."""
    _, _, v = colorsys.rgb_to_hsv(*rgb)
    value = max(0.20, v)
    saturation = 0.25 if v > 0.5 else 0.75
    r, g, b = colorsys.hsv_to_rgb(TINT_HUE / 360, saturation, value)
    return f"48;2;{round(r * 255)};{round(g * 255)};{round(b * 255)}"


def query_terminal_background(fd: int, timeout: float = 0.1) -> tuple[float, float, float] | None:
    """Ask the terminal for its background colour (OSC 11); None if it does not answer in time."""
    if os.environ.get("TERM") == "linux":
        return (0.0, 0.0, 0.0)
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        return None
    try:
        tty.setraw(fd, termios.TCSANOW)
        os.write(fd, b"\x1b]11;?\x1b\\")
        reply = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (reply.endswith(b"\x1b\\") or reply.endswith(b"\x07")):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            reply += os.read(fd, 256)
    except OSError:
        return None
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
    m = re.search(rb"rgb:([0-9a-fA-F]+)/([0-9a-fA-F]+)/([0-9a-fA-F]+)", reply)
    if not m:
        return None
    red, green, blue = (int(c, 16) / (16 ** len(c) - 1) for c in m.groups())
    return red, green, blue


def _sgr_resets_background(params: bytes) -> bool:
    fields = params.split(b";") if params else [b""]
    resets = False
    i = 0
    while i < len(fields):
        f = fields[i]
        if f in (b"", b"0", b"00", b"49"):
            resets = True
        elif f in (b"38", b"48", b"58"):
            if f == b"48":
                resets = False
            kind = fields[i + 1] if i + 1 < len(fields) else b""
            i += {b"5": 2, b"2": 4}.get(kind, 1)
        elif f.isdigit() and (40 <= int(f) <= 47 or 100 <= int(f) <= 107):
            resets = False
        i += 1
    return resets


class Tinter:
    """Rewrites the guest's output stream so the background tint persists."""

    def __init__(self, color: str) -> None:
        self._sgr = f"\x1b[{color}m".encode()
        self._color = color.encode()
        self._started = False
        self._pending = bytearray()  # an escape sequence we have not finished reading

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if not self._started:
            out += self._sgr + b"\x1b[K"
            self._started = True
        i, end = 0, len(data)
        while i < end:
            if self._pending:  # inside an escape sequence (short: at most MAX_SEQUENCE bytes)
                self._pending.append(data[i])
                self._advance(out)
                i += 1
                continue
            special = _SPECIAL.search(data, i)  # plain text is copied as it is, not byte by byte
            if special is None:
                out += data[i:]
                break
            j = special.start()
            out += data[i:j]
            if data[j] == ESC:
                self._pending.append(ESC)
            else:  # a line end: the tint again
                out.append(data[j])
                out += self._sgr
            i = j + 1
        return bytes(out)

    def _advance(self, out: bytearray) -> None:
        seq = self._pending
        if len(seq) == 2:
            if seq[1] == ord("c"):  # full reset
                out += seq + self._sgr
                seq.clear()
            elif seq[1] not in (ord("["), ord("]")):
                out += seq
                seq.clear()
            return
        if len(seq) > MAX_SEQUENCE:
            out += seq
            seq.clear()
            return
        if seq[1] == ord("]"):  # OSC: ends with BEL or ST
            if seq[-1] == 0x07 or seq.endswith(b"\x1b\\"):
                out += seq
                seq.clear()
            return
        final = seq[-1]
        if 0x40 <= final <= 0x7E:
            params = bytes(seq[2:-1])
            if final == ord("m") and _sgr_resets_background(params):
                out += seq[:-1] + (b";" if params else b"0;") + self._color + b"m"
            else:
                out += seq
                if final == ord("p") and params == b"!":  # soft reset
                    out += self._sgr
            seq.clear()


def title_start(title: str) -> bytes:
    """Push the window title and set ours."""
    return b"\x1b[22;2t" + f"\x1b]2;{title[:128]}\x1b\\".encode()


TITLE_END = b"\x1b[23;2t"
RESET = b"\x1b[!p\x1b]104\x1b\\\x1b[0m\x1b[?7h"
