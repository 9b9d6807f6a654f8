"""Per-request plumbing as pure ASGI: request id, body size cap, one JSON log line, last-resort 500."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.monitoring.metrics import REQUEST_DURATION, REQUESTS_IN_PROGRESS

log = structlog.get_logger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class RequestContextMiddleware:
    """Wraps every HTTP request.

    - ``X-Request-ID`` is taken from the client when it is a sane token, generated otherwise, bound to
      every log line of the request and echoed on the response.
    - A body over ``max_body_bytes`` is refused with 413 while it is read (``Content-Length`` or chunked),
      so a worker never holds more than the cap in memory for one request; one that is not UTF-8 (so
      not JSON) gets 422.
    - One ``request`` log line (method, route template, status, latency, model version; never the body)
      and one ``sentiment_request_duration_seconds`` observation.
    - An unhandled exception becomes a JSON 500 without a traceback (the traceback goes to the log).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, measure: bool = True) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.measure = measure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        supplied = _header(scope, b"x-request-id")
        request_id = supplied if supplied and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        state: dict[str, Any] = {"status": None, "model_version": None}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                state["status"] = message["status"]
                state["model_version"] = headers.get("x-model-version")
            await send(message)

        if self.measure:
            REQUESTS_IN_PROGRESS.inc()
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                replay = await self._read_body(scope, receive, send_with_id)
                if replay is not None:
                    await self.app(scope, replay, send_with_id)
            except Exception:
                log.exception("unhandled_error", path=scope.get("path"))
                if state["status"] is None:
                    await error_response(500, "internal_error", "internal server error")(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                # The route template, never the raw path: label values stay few whatever clients send.
                route = getattr(scope.get("route"), "path", "unmatched")
                if self.measure:
                    REQUESTS_IN_PROGRESS.dec()
                    REQUEST_DURATION.labels(scope["method"], route, str(state["status"])).observe(elapsed)
                log.info(
                    "request",
                    method=scope["method"],
                    route=route,
                    status=state["status"],
                    latency_ms=round(elapsed * 1000, 3),
                    model_version=state["model_version"],
                )

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body within the cap and return a ``receive`` that replays it; None if refused."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return None
            if int(declared) > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")  # JSON is UTF-8; FastAPI would answer a bare 400 for anything else
        except UnicodeDecodeError as exc:
            await error_response(422, "malformed_json", "request body is not valid UTF-8", {"position": exc.start})(
                scope, receive, send
            )
            return None
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "payload_too_large",
            f"request body exceeds {self.max_body_bytes} bytes",
            {"max_body_bytes": self.max_body_bytes},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
