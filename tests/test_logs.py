"""Log lines: the service's structlog events and the standard library's records are one JSON object per line
on stdout, with the same fields, and events below the configured level are not written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import logging.config
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from app.logs import configure_structlog, dict_config


@pytest.fixture
def stdlib_to_buffer() -> Iterator[io.StringIO]:
    """The standard library's JSON handler (``dict_config``) writing to a buffer, removed afterwards."""
    names = (None, "gunicorn.error", "uvicorn", "uvicorn.error", "gunicorn.access", "uvicorn.access")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        logging.config.dictConfig(dict_config("info"))
    yield buffer
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_structlog_event_is_one_json_line_on_stdout_with_its_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_structlog("info")
    log = structlog.get_logger("app.access")
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        log.info("request", method="POST", status=200)
    log.debug("too_detailed")
    (line,) = lines(capsys.readouterr().out)
    assert line["event"] == "request" and line["request_id"] == "req-1" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "app.access"
    assert isinstance(line["pid"], int) and line["timestamp"].endswith("Z")


def test_an_exception_is_rendered_into_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_structlog("info")
    try:
        raise ValueError("broken")
    except ValueError:
        structlog.get_logger("app.access").exception("unhandled_error")
    (line,) = lines(capsys.readouterr().out)
    assert line["level"] == "error" and "ValueError: broken" in line["exception"]


def test_standard_library_records_get_the_same_fields(
    stdlib_to_buffer: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_structlog("warning")
    logging.getLogger("gunicorn.error").info("Booting worker with pid: %s", 7)
    structlog.get_logger("app.monitoring").info("below_the_level")
    structlog.get_logger("app.monitoring").warning("at_the_level")
    (record,) = lines(stdlib_to_buffer.getvalue())
    (event,) = lines(capsys.readouterr().out)
    assert record["event"] == "Booting worker with pid: 7" and record["logger"] == "gunicorn.error"
    assert event["event"] == "at_the_level" and event["level"] == "warning"
    assert set(record) == set(event) == {"event", "level", "logger", "pid", "timestamp"}
