"""Structured logging for every torpor process: one JSON object (or one console line) per event.

Context that identifies what an event is about (`model`, `runtime`, `gpu`, `request`) is
bound with `bind()`; it rides on contextvars, so it follows asyncio tasks and is attached to
every event logged inside the `with` block.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_configured = False


def configure(*, json: bool | None = None, level: str = "info", stream: Any = None) -> None:
    """Set up structlog and the stdlib root logger once per process.

    `json=None` picks JSON lines unless the stream is a terminal.
    """
    global _configured
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric, stream=stream, format="%(name)s %(levelname)s %(message)s")
    _configured = True


def get_logger(component: str) -> Any:
    """A logger whose events carry `component` (lazy: configure() may come later)."""
    return structlog.get_logger(component=component)


@contextlib.contextmanager
def bind(**ids: object) -> Iterator[None]:
    """Attach ids (model=, runtime=, gpu=, request=) to every event logged inside the block."""
    with structlog.contextvars.bound_contextvars(**{k: v for k, v in ids.items() if v is not None}):
        yield
