"""The uvicorn worker gunicorn runs: uvicorn's own, with connection limits and timeouts for slow clients.

uvicorn closes a keep-alive connection that stays silent after a response, but not a new connection that
never sends a byte nor one that trickles its request head, and its 503 for too many connections is plain
text. :class:`GuardedHttpToolsProtocol` closes both kinds of connection and answers that 503 in the API's
error shape; :class:`SentimentWorker` passes gunicorn's ``worker_connections`` to uvicorn as
``limit_concurrency``. The request body's deadline is the API's (``BodyReadTimeoutMiddleware``).
:func:`freeze_startup_heap` keeps the cyclic garbage collector off what a worker holds for its life.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from typing import Any, ClassVar

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn_worker import UvicornWorker

from app.settings import Settings

GC_YOUNG_THRESHOLD = 10_000
"""Net new container objects between two young-generation collections (CPython's default: 700). A request
leaves little behind, so collections become rare; cyclic garbage still triggers them past this many objects."""


def freeze_startup_heap() -> None:
    """Move every object the worker has built so far (the imported libraries, the app: about 180,000 objects)
    out of the garbage collector's reach, and collect the young generation less often.

    Called once per worker (gunicorn's ``post_worker_init``); :class:`app.serving.models.ModelManager` freezes
    each model it loads afterwards. Before, a full collection walked all of it (about 110 ms) every few seconds
    under load, and young collections ran every few requests: about 90 us of GC per request in all, nearly
    nothing after (``bench/request_profile.py``, the whole app in process). Frozen objects are still freed
    when their last reference goes; only a reference cycle among them is kept, and start-up objects live as
    long as the worker anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@functools.cache
def _busy_response() -> Any:
    # Built in the worker on first use: importing the API (FastAPI, SQLAlchemy) would grow the gunicorn
    # master, which loads this module for the worker class, by about 20 MB.
    from app.api.errors import error_response

    return error_response(
        503, "server_busy", "too many connections to this worker; retry shortly", headers={"Connection": "close"}
    )


async def _server_busy(scope: Any, receive: Any, send: Any) -> None:
    await _busy_response()(scope, receive, send)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: a new connection gets the keep-alive timeout to send its first
    byte, a request head must be complete within ``head_timeout_seconds`` of its first byte, and the
    over-the-limit 503 is JSON."""

    head_timeout_seconds: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms this timer only after a response; any received byte cancels it (data_received).
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_seconds, self.timeout_keep_alive_handler)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        super()._start_asgi_task(cycle, _server_busy if app is service_unavailable else app)


class SentimentWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn_worker ships no type information
    """``uvicorn_worker.UvicornWorker`` with the guarded protocol and gunicorn's ``worker_connections`` as
    uvicorn's ``limit_concurrency`` (open connections and running requests, each)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings()
        protocol = type(
            "GuardedHttpToolsProtocol",
            (GuardedHttpToolsProtocol,),
            {"head_timeout_seconds": settings.body_read_timeout_seconds},
        )
        self.config.http = protocol
        self.config.limit_concurrency = self.cfg.worker_connections
