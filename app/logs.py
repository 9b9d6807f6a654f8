"""structlog configuration: one JSON object per line on stdout, for every process of the service.

The service's own events (structlog loggers) are rendered by structlog and written straight to stdout;
records of the standard library's loggers (gunicorn, uvicorn, alembic) go through the JSON handler of
:func:`dict_config`, which renders them with the same processors. One line per event either way.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger


def _add_pid(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Which process wrote the line: gunicorn workers, the master and the monitors share one stdout."""
    event["pid"] = os.getpid()
    return event


_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    _add_pid,
    structlog.processors.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def dict_config(level: str = "info") -> dict[str, Any]:
    """``logging.config.dictConfig`` schema rendering every standard-library record as structlog JSON.

    gunicorn takes it as ``logconfig_dict``; its own and uvicorn's loggers then print JSON too.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": _SHARED,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
            }
        },
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"handlers": ["json"], "level": level.upper()},
        # uvicorn_worker copies gunicorn.error's handlers onto uvicorn.error and stops propagation, so
        # these loggers carry the JSON handler themselves rather than relying on the root logger.
        "loggers": {
            name: {"handlers": ["json"], "propagate": False, "level": level.upper()}
            for name in ("gunicorn.error", "uvicorn", "uvicorn.error")
        }
        # The access log would repeat the request line our middleware writes, with less in it.
        | {name: {"handlers": [], "propagate": False} for name in ("gunicorn.access", "uvicorn.access")}
        # Alembic announces each of its plugins at INFO whenever a process checks the schema revision.
        | {"alembic.runtime.plugins": {"level": "WARNING"}},
    }


class LineWriter:
    """What structlog loggers write to: each rendered event as one line on the current ``sys.stdout``.

    The standard library's handler chain would add two ``LogRecord`` objects, a caller lookup and a
    formatter pass per line, the larger part of an access-log line's cost (``bench/request_profile.py``).
    """

    def __init__(self, name: str = "app") -> None:
        self.name = name  # the "logger" field (structlog.stdlib.add_logger_name reads it)

    def msg(self, message: str) -> None:
        stream = sys.stdout  # looked up per line: whatever stdout is now (a test's capture, a redirect)
        stream.write(message + "\n")  # one write per line: lines of several threads never interleave
        stream.flush()

    debug = info = warning = error = critical = exception = msg


def configure_structlog(level: str = "info") -> None:
    """structlog loggers render their events as JSON (the processors the standard library's records get)
    and write them to stdout; events below ``level`` cost one method call."""
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=LineWriter,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        cache_logger_on_first_use=True,
    )


def configure_logging(level: str = "info") -> None:
    """Configure both structlog and the standard library (for CLI tools and the drift monitor)."""
    configure_structlog(level)
    logging.config.dictConfig(dict_config(level))
