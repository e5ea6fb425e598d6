"""structlog set-up: human-readable on a terminal, one key=value line per event otherwise."""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(verbose: bool = False, stream=None) -> None:
    """Configure structlog for a front end (vmspawn, vmspawnd, vmspawnctl)."""
    stream = stream or sys.stderr
    renderer: structlog.types.Processor
    if stream.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.processors.LogfmtRenderer(key_order=["level", "event"], drop_missing=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
