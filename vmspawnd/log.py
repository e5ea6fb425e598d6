"""structlog set-up: human-readable on a terminal, one key=value line per event otherwise,
and native journal entries (with MACHINE= etc. as fields) when running under systemd."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


class JournalLogger:
    """A structlog logger that sends each event to the journal with its context as fields."""

    def msg(self, **event: Any) -> None:
        from systemd import journal

        fields = {k.upper(): str(v) for k, v in event.items() if k not in ("event", "level") and v is not None}
        message = " ".join([str(event.get("event", ""))] + [f"{k}={v}" for k, v in event.items()
                                                            if k not in ("event", "level") and v is not None])
        journal.send(message, PRIORITY=str(_PRIORITY.get(event.get("level", "info"), 6)),
                     SYSLOG_IDENTIFIER="vmspawnd", **fields)

    log = debug = info = warning = error = critical = exception = msg


def setup_logging(verbose: bool = False, stream=None, journal: bool = False) -> None:
    """Configure structlog for a front end (vmspawn, vmspawnd, vmspawnctl)."""
    stream = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if journal:
        factory: Any = lambda *args: JournalLogger()  # noqa: E731
        processors.append(lambda _logger, _name, event: event)
    else:
        factory = structlog.PrintLoggerFactory(stream)
        if stream.isatty():
            processors.append(structlog.dev.ConsoleRenderer(colors=True))
        else:
            processors.append(structlog.processors.LogfmtRenderer(key_order=["level", "event"], drop_missing=True))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
