"""Per-request plumbing as pure ASGI middleware, one concern each.

``create_app`` stacks them outermost first: :class:`RequestIdMiddleware`, :class:`AccessLogMiddleware`,
:class:`InternalErrorMiddleware`, :class:`BodyReadTimeoutMiddleware`, :class:`BodyLimitMiddleware`,
:class:`Utf8BodyMiddleware`. So the request id is on every response and log line, the access log and the
latency histogram see the final status (500s included), and the UTF-8 check reads through the size cap
and the read deadline. Every class passes non-HTTP
scopes through untouched. This is the hot path: each layer costs one call and at most one closure.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterable

import structlog
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.monitoring.metric_writes import WRITES
from app.monitoring.metrics import REQUEST_DURATION, REQUESTS_IN_PROGRESS

log = structlog.get_logger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON_METHODS = frozenset({"POST"})  # the only method any route reads a body with
# Label values of the request metrics: the standard methods; anything else (WebDAV verbs...) is "other".
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class RequestIdMiddleware:
    """``X-Request-ID``: the client's when it is a sane token (1-128 of ``A-Za-z0-9._:-``), generated
    otherwise; bound to every log line of the request and echoed on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = _header(scope["headers"], b"x-request-id")
        # 128 random bits as 32 hex digits: a uuid4's randomness without building a UUID object.
        request_id = supplied if supplied and _REQUEST_ID.match(supplied) else os.urandom(16).hex()
        encoded = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", encoded)]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)


class _TrackedSend:
    """An ASGI ``send`` that remembers the response start message once it has gone out (None before)."""

    __slots__ = ("send", "start")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        await self.send(message)


class AccessLogMiddleware:
    """One ``request`` log line per request (method, route template, status, latency, model version;
    never the body) and, with ``measure``, ``sentiment_request_duration_seconds`` and
    ``sentiment_requests_in_progress``."""

    def __init__(self, app: ASGIApp, measure: bool = True) -> None:
        self.app = app
        self.measure = measure
        # The histogram child of each (method, route, status): labels() costs as much as the observation.
        # Few keys: known methods, route templates and the statuses the service answers.
        self._latency: dict[tuple[str, str, int | None], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        tracked = _TrackedSend(send)
        if self.measure:
            WRITES.inc(REQUESTS_IN_PROGRESS)
        try:
            await self.app(scope, receive, tracked)
        finally:
            self._done(scope, tracked.start, time.perf_counter() - started)

    def _done(self, scope: Scope, start: Message | None, elapsed: float) -> None:
        status = start["status"] if start is not None else None
        # The route template, never the raw path: label values stay few whatever clients send.
        route = getattr(scope.get("route"), "path", "unmatched")
        if self.measure:
            WRITES.inc(REQUESTS_IN_PROGRESS, -1.0)
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
            latency = self._latency.get((method, route, status))
            if latency is None:
                latency = self._latency[method, route, status] = REQUEST_DURATION.labels(method, route, str(status))
            WRITES.observe(latency, elapsed)
        version = _header(start.get("headers", ()), b"x-model-version") if start is not None else None
        log.info(
            "request",
            method=scope["method"],
            route=route,
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            model_version=version,
        )


class InternalErrorMiddleware:
    """Last resort: an unhandled exception becomes ``500 internal_error`` JSON without a traceback (the
    traceback goes to the log). Starlette's own ``ServerErrorMiddleware`` sits outside every user
    middleware, so its 500 would carry no request id and miss the access log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled_error", path=scope.get("path"))
            if tracked.start is None:
                await error_response(500, "internal_error", "internal server error")(scope, receive, send)


async def _answer_unless_started(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    wrapped_receive: Receive,
    signal: type[Exception],
    answer: Callable[[], ASGIApp],
) -> None:
    """Run ``app`` reading the body through ``wrapped_receive``; when that raises ``signal`` before the response
    started, send ``answer()`` instead. After the response started the exception propagates and the server
    cuts the connection: a second response cannot follow the first."""
    tracked = _TrackedSend(send)
    try:
        await app(scope, wrapped_receive, tracked)
    except signal:
        if tracked.start is not None:
            raise
        await answer()(scope, receive, send)


class _BodyReadTimeout(Exception):
    """Raised by the timed ``receive`` once the read deadline passed; never leaves the middleware."""


class BodyReadTimeoutMiddleware:
    """A request body that has not fully arrived ``timeout_seconds`` after the request started gets
    ``408 request_timeout`` (and the connection is closed), so a client trickling its body cannot hold a
    request slot for ever. The deadline covers the whole body, not each read; reads after the body ended
    (waiting for a disconnect) are not timed. The server closes connections that are silent, or slow to
    send a request head (``app.gunicorn_worker``)."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_seconds
        body_done = False

        async def receive_timed() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyReadTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        def timed_out() -> ASGIApp:
            return error_response(
                408,
                "request_timeout",
                f"request body not received within {self.timeout_seconds:g} s",
                headers={"Connection": "close"},
            )

        await _answer_unless_started(
            self.app, scope, receive, send, wrapped_receive=receive_timed, signal=_BodyReadTimeout, answer=timed_out
        )


class _BodyTooLarge(Exception):
    """Raised by the capped ``receive`` once the body passed the cap; never leaves the middleware."""


class BodyLimitMiddleware:
    """Refuses a body over ``max_body_bytes`` with ``413 payload_too_large`` while it is read, so a worker
    never holds more than the cap for one request: at once when ``Content-Length`` says so, chunk by chunk
    when the body is chunked (no ``Content-Length``).

    Dedicated rather than the framework's: Starlette 1.10 / FastAPI 0.165 ``max_body_size`` answers a
    plain-text 413 in some paths (``{"detail": ...}`` in others), outside the request-id and access-log
    middleware, so it would break the documented error shape.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope["headers"], b"content-length")
        if declared is not None:
            # The server holds a body to its Content-Length: a declared size within the cap needs no count.
            if not (declared.isascii() and declared.isdigit()):
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
            elif int(declared) > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = 0

        async def receive_capped() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            return message

        await _answer_unless_started(
            self.app, scope, receive, send, wrapped_receive=receive_capped, signal=_BodyTooLarge, answer=self._too_large
        )

    def _too_large(self) -> ASGIApp:
        return error_response(
            413,
            "payload_too_large",
            f"request body exceeds {self.max_body_bytes} bytes",
            {"max_body_bytes": self.max_body_bytes},
            headers={"Connection": "close"},
        )


class Utf8BodyMiddleware:
    """A request body that is not UTF-8 (so not JSON) gets ``422 malformed_json``; FastAPI itself would
    answer a bare 400. Reads the whole body (within the cap and the deadline of the layers outside) and
    replays it. Only for POST, the one method routes read a body with: any other method goes on to the
    router untouched and gets its ``405``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _JSON_METHODS:
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if message.get("more_body", False):
            whole = await self._rest(message, receive)
            if whole is None:
                return
            message = {"type": "http.request", "body": whole, "more_body": False}
        body: bytes = message.get("body", b"")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            details = {"position": exc.start}
            await error_response(422, "malformed_json", "request body is not valid UTF-8", details)(
                scope, receive, send
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return message

        await self.app(scope, replay, send)

    @staticmethod
    async def _rest(first: Message, receive: Receive) -> bytes | None:
        """The whole body of a request sent in several chunks; None if the client went away."""
        chunks: list[bytes] = [first.get("body", b"")]
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
