"""structlog configuration: one JSON object per line on stdout, for every process of the service."""

from __future__ import annotations

import logging.config
import os
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


def configure_structlog() -> None:
    """structlog loggers hand their event dicts to the standard library's JSON handler."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def configure_logging(level: str = "info") -> None:
    """Configure both structlog and the standard library (for CLI tools and the drift monitor)."""
    configure_structlog()
    logging.config.dictConfig(dict_config(level))
