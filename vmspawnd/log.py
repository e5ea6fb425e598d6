# SPDX-License-Identifier: LGPL-2.1-or-later
"""Logging through structlog: human-readable on a terminal, one key=value line per event otherwise,
and native journal entries (with MACHINE= etc. as fields) when running under systemd.

Our modules log through :func:`get_logger`, whose loggers drop what is below the configured level
themselves and import structlog only for the first event that passes it.  So a command that logs
nothing (``vmspawn`` at its default level, before its VM fails) never pays for importing structlog
(≈ 11 ms here, before QEMU's exec), and the daemon loads it at its first line, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from types import FrameType, ModuleType
from typing import Any, TextIO

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

_NOT_IN_THE_MESSAGE = ("event", "level", "message_id")

#: the level below which our loggers drop an event (all pass until :func:`setup_logging` is called)
_threshold = logging.NOTSET
#: :func:`setup_logging`'s arguments not yet applied to structlog (they are when it is first needed)
_pending: dict[str, Any] | None = None
#: structlog, once imported
_structlog: ModuleType | None = None


def _caller() -> dict[str, Any]:
    """CODE_FILE/CODE_LINE/CODE_FUNC of the code that logged (not of structlog or of this module),
    as ``journal.send`` takes them (the line an int)."""
    not_the_caller = (os.path.dirname(sys.modules["structlog"].__file__ or ""), __file__)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(not_the_caller):
        frame = frame.f_back
    if frame is None:
        return {}
    return {"CODE_FILE": frame.f_code.co_filename, "CODE_LINE": frame.f_lineno, "CODE_FUNC": frame.f_code.co_name}


class JournalLogger:
    """A structlog logger that sends each event to the journal with its context as fields
    (``machine=`` becomes MACHINE=, ``message_id=`` MESSAGE_ID=), and where it was logged from."""

    def msg(self, **event: Any) -> None:
        from systemd import journal  # on first use: a command that never logs to the journal never loads it

        fields = {k.upper(): str(v) for k, v in event.items() if k not in ("event", "level") and v is not None}
        message = " ".join([str(event.get("event", ""))] + [f"{k}={v}" for k, v in event.items()
                                                            if k not in _NOT_IN_THE_MESSAGE and v is not None])
        try:
            journal.send(message, PRIORITY=str(_PRIORITY.get(event.get("level", "info"), 6)),
                         SYSLOG_IDENTIFIER="vmspawnd", **{**fields, **_caller()})
        except Exception as e:  # logging must never take the daemon down: say it on stderr instead
            print(f"vmspawnd: {message} (journal: {e})", file=sys.stderr, flush=True)

    log = debug = info = warning = error = critical = exception = msg


#: systemd's level names (``$SYSTEMD_LOG_LEVEL``, ``--log-level=``) and numbers, as logging levels
LEVELS = {"emerg": logging.CRITICAL, "alert": logging.CRITICAL, "crit": logging.CRITICAL, "err": logging.ERROR,
          "error": logging.ERROR, "warning": logging.WARNING, "notice": logging.INFO, "info": logging.INFO,
          "debug": logging.DEBUG}
LEVELS.update({str(n): level for n, level in enumerate(
    [logging.CRITICAL] * 3 + [logging.ERROR, logging.WARNING, logging.INFO, logging.INFO, logging.DEBUG])})


def parse_level(value: str) -> int:
    """A systemd log level (name or 0…7) as a logging level; ValueError if it is none."""
    try:
        return LEVELS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {value!r} (debug, info, notice, warning, err, crit, alert, emerg, "
                         "or 0…7)") from None


def command_level(quiet: bool = False, verbose: bool = False, option: str | None = None,
                  default: int = logging.WARNING) -> int:
    """The level of a command-line tool: ``--log-level=``, else ``-v``/``-q``, else $SYSTEMD_LOG_LEVEL."""
    if option:
        return parse_level(option)
    if verbose:
        return logging.INFO
    if quiet:
        return logging.ERROR
    env = os.environ.get("SYSTEMD_LOG_LEVEL")
    if env:
        with contextlib.suppress(ValueError):
            return parse_level(env)
    return default


class PlainRenderer:
    """``program: message (key=value …)``: one plain line per event, for a command's stderr."""

    def __init__(self, program: str) -> None:
        self.program = program

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> str:
        message = str(event.pop("event", ""))
        event.pop("level", None)
        event.pop("message_id", None)
        exc = event.pop("exception", None)
        details = " ".join(f"{k}={v}" for k, v in event.items() if v is not None)
        line = f"{self.program}: {message}" + (f" ({details})" if details else "")
        return line + (f"\n{exc}" if exc else "")


def setup_logging(verbose: bool = False, stream: TextIO | None = None, journal: bool = False, *,
                  program: str | None = None, level: int | None = None) -> None:
    """Configure logging: the daemon logs at info (debug with ``verbose``) to the journal or stderr;
    a command (``program``) prints only what reaches ``level`` (default: warnings), one plain line each.
    structlog is configured now if it is loaded, else when an event first needs it."""
    global _threshold, _pending
    if level is None:
        level = logging.DEBUG if verbose else logging.INFO
    _threshold = level
    _pending = {"stream": stream or sys.stderr, "journal": journal, "program": program, "level": level}
    if "structlog" in sys.modules:
        _loaded_structlog()


def _loaded_structlog() -> ModuleType:
    """structlog, imported on first use, and configured once with each :func:`setup_logging`'s
    arguments (not again later, which would undo a configuration made since, as a test's)."""
    global _structlog, _pending
    if _structlog is None:
        import structlog

        _structlog = structlog
    if _pending is not None:
        settings, _pending = _pending, None
        _configure(_structlog, **settings)
    return _structlog


def _configure(structlog: ModuleType, stream: TextIO, journal: bool, program: str | None, level: int) -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if journal:
        factory: Any = lambda *args: JournalLogger()  # noqa: E731
        processors.append(lambda _logger, _name, event: event)
    elif program is not None:
        factory = structlog.PrintLoggerFactory(stream)
        processors.append(PlainRenderer(program))
    else:
        factory = structlog.PrintLoggerFactory(stream)
        if stream.isatty():
            processors.append(structlog.dev.ConsoleRenderer(colors=True))
        else:
            processors.append(structlog.processors.LogfmtRenderer(key_order=["level", "event"], drop_missing=True))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


class Logger:
    """A module's logger: ``log.info("event", key=value)``, ``log.bind(key=value)``, as structlog's.
    An event below the configured level is dropped here; the others go to structlog."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any] | None = None) -> None:
        self._context = context or {}

    def bind(self, **context: Any) -> Logger:
        """A logger that adds ``context`` to every event."""
        return Logger({**self._context, **context})

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        logger = _loaded_structlog().get_logger()
        if self._context:
            logger = logger.bind(**self._context)
        getattr(logger, method)(event, **fields)

    def debug(self, event: str, /, **fields: Any) -> None:
        if _threshold <= logging.DEBUG:
            self._emit("debug", event, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        if _threshold <= logging.INFO:
            self._emit("info", event, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        if _threshold <= logging.WARNING:
            self._emit("warning", event, fields)

    def error(self, event: str, /, **fields: Any) -> None:
        if _threshold <= logging.ERROR:
            self._emit("error", event, fields)

    def exception(self, event: str, /, **fields: Any) -> None:
        """An error with the exception being handled (call it in an ``except`` block)."""
        if _threshold <= logging.ERROR:
            self._emit("exception", event, fields)

    def critical(self, event: str, /, **fields: Any) -> None:
        if _threshold <= logging.CRITICAL:
            self._emit("critical", event, fields)


def get_logger() -> Logger:
    """A logger for a module (``log = get_logger()`` at its top)."""
    return Logger()
