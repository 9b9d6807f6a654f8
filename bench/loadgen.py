"""Load generation on raw HTTP/1.1 keep-alive connections: a closed loop (saturation) and an open loop (fixed rate).

The client shares the machine's cores with the server, so it is hand-rolled on asyncio streams (uvloop when
installed): a request costs tens of µs of client CPU, several times less than httpx. It speaks just the
HTTP/1.1 the service answers with (``Content-Length`` or chunked bodies, keep-alive).
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
# The service closes keep-alive connections idle for 5 s (SENTIMENT_KEEPALIVE_SECONDS); reopen before that.
MAX_IDLE_SECONDS = 4.0
STATS: Counter[str] = Counter()  # stale_retries, and the exception name of every request without a response
ERROR = 0  # the "status" recorded when a request got no HTTP response (connection refused, reset, bad framing)


def post_json(host: str, path: str, body: bytes) -> bytes:
    """The bytes of a keep-alive ``POST path`` with a JSON body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class Connection:
    """One keep-alive connection; reopened transparently after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0
        self.answered = False

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """Send ``payload`` (a whole request) and return (status, body).

        Like HTTP client pools, a kept-alive connection the server already closed (idle timeout) is not
        reused, and a request whose reused connection died before any response byte is sent once more on a
        fresh one (counted in ``STATS["stale_retries"]``; the prediction-log check would see a duplicate).
        """
        if self.reader is not None and (self.reader.at_eof() or time.perf_counter() - self.used > MAX_IDLE_SECONDS):
            self.close()
        reused = self.reader is not None
        self.answered = False
        try:
            return await self._exchange(payload)
        except CONNECTION_ERRORS:
            if not reused or self.answered:
                raise
            STATS["stale_retries"] += 1
            return await self._exchange(payload)

    async def _exchange(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        reader = self.reader
        try:
            self.writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            self.answered = True
            status = int(head[9:12])
            lower = head.lower()
            start = lower.find(b"\r\ncontent-length:")
            if start >= 0:
                end = lower.index(b"\r\n", start + 2)
                body = await reader.readexactly(int(lower[start + 17 : end]))
            elif b"\r\ntransfer-encoding: chunked" in lower:
                chunks = []
                while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                    chunks.append((await reader.readexactly(size + 2))[:-2])
                await reader.readuntil(b"\r\n")
                body = b"".join(chunks)
            else:
                raise ValueError("response without a length")
            if b"\r\nconnection: close" in lower:
                self.close()
            self.used = time.perf_counter()
            return status, body
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Window:
    """What completed within one window of wall time."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))


class Tally:
    """Responses binned by completion time into windows of ``window_seconds`` from ``start`` (``perf_counter``)."""

    def __init__(self, start: float, window_seconds: float) -> None:
        self.start, self.window_seconds = start, window_seconds
        self.windows: list[Window] = []

    def add(self, done: float, latency_ms: float, status: int) -> None:
        index = max(0, int((done - self.start) / self.window_seconds))
        while len(self.windows) <= index:
            self.windows.append(Window())
        window = self.windows[index]
        window.statuses[status] += 1
        window.latencies_ms.append(latency_ms)

    def statuses(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for window in self.windows:
            total.update(window.statuses)
        return total


def prediction_id(body: bytes) -> bytes:
    """The ``id`` of a /v1/predict answer (``{"id":"<32 hex>",...}``, else parsed as JSON)."""
    if body.startswith(b'{"id":"') and body[39:40] == b'"':
        return body[7:39]
    return str(json.loads(body)["id"]).encode()


OnBody = Callable[[int, bytes], None]


async def closed_loop(
    host: str, port: int, payloads: Sequence[bytes], *, connections: int, seconds: float, tally: Tally, on_body: OnBody
) -> float:
    """``connections`` clients each send the next request as soon as the last one answered, for ``seconds``;
    return the completed requests per second."""
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**12))
    done = 0

    async def client() -> None:
        nonlocal done
        connection = Connection(host, port)
        try:
            while (now := time.perf_counter()) < deadline:
                payload = payloads[next(counter) % len(payloads)]
                try:
                    status, body = await connection.request(payload)
                except CONNECTION_ERRORS as exc:
                    STATS[type(exc).__name__] += 1
                    status, body = ERROR, b""
                finished = time.perf_counter()
                tally.add(finished, (finished - now) * 1000, status)
                on_body(status, body)
                done += 1
        finally:
            connection.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.perf_counter() - began)


async def open_loop(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    tally: Tally,
    on_body: OnBody,
    max_connections: int = 256,
) -> dict[str, float]:
    """Start one request every 1/``rate`` s for ``seconds`` whatever the responses do.

    Latency runs from the request's scheduled start, so time spent waiting for a free connection (at most
    ``max_connections`` in flight) counts: no coordinated omission. Returns the scheduler's facts: requests
    scheduled, the longest the scheduler woke up late (ms), the most requests ever in flight or queued.
    """
    idle: deque[Connection] = deque()
    backlog: deque[tuple[float, bytes]] = deque()
    opened = 0
    in_flight = 0
    most_in_flight = 0
    tasks: set[asyncio.Task[None]] = set()

    async def run(connection: Connection, scheduled: float, payload: bytes) -> None:
        nonlocal in_flight
        while True:
            try:
                status, body = await connection.request(payload)
            except CONNECTION_ERRORS as exc:
                STATS[type(exc).__name__] += 1
                status, body = ERROR, b""
            finished = time.perf_counter()
            tally.add(finished, (finished - scheduled) * 1000, status)
            on_body(status, body)
            in_flight -= 1
            if not backlog:
                idle.append(connection)
                return
            scheduled, payload = backlog.popleft()

    total = int(rate * seconds)
    begin = time.perf_counter()
    sent = 0
    worst_lag = 0.0
    while sent < total:
        now = time.perf_counter()
        worst_lag = max(worst_lag, now - (begin + sent / rate))
        due = min(total, int((now - begin) * rate) + 1)
        while sent < due:
            scheduled, payload = begin + sent / rate, payloads[sent % len(payloads)]
            sent += 1
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            if idle:
                connection = idle.pop()
            elif opened < max_connections:
                connection = Connection(host, port)
                opened += 1
            else:
                backlog.append((scheduled, payload))
                continue
            task = asyncio.create_task(run(connection, scheduled, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, begin + sent / rate - time.perf_counter()))
    while tasks:
        await asyncio.gather(*list(tasks))
    for connection in idle:
        connection.close()
    return {
        "scheduled": float(total),
        "scheduler_worst_lag_ms": worst_lag * 1000,
        "most_in_flight": float(most_in_flight),
        "connections_opened": float(opened),
    }


def run_async(coroutine_factory: Callable[[], Any]) -> Any:
    """Run the coroutine ``coroutine_factory()`` makes to completion on a fresh event loop (uvloop when
    installed, as the service's workers run) and return its result."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine_factory())
