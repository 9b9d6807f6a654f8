"""Coalesces concurrent prediction calls in one worker into few model calls.

Per-call overhead is a large share of the cost of one text, so requests that arrive while the model is
busy are answered together by the next call. Nothing waits for a batch to fill: an idle worker serves a
lone request at once. A caller may pass ``on_result``, run in the batch's own step before any of its callers
resumes: what a caller does there for a whole batch at once (the predictor: one spool write, the batch's
counts gathered for the worker's next metric write) is done before any of the batch's responses can be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog
from numpy.typing import NDArray
from prometheus_client import Histogram

from app.monitoring.metric_writes import WRITES
from app.monitoring.metrics import INFERENCE_DURATION
from app.serving.models import ServedModel

log = structlog.get_logger(__name__)

OnResult = Callable[[NDArray[np.float64]], None]
"""Called with one caller's rows of class probabilities inside the batch step, before the caller resumes."""


@dataclass
class _Pending:
    model: ServedModel
    texts: list[str]
    future: asyncio.Future[NDArray[np.float64]] = field(repr=False)
    on_result: OnResult | None = field(default=None, repr=False)


class InferenceBatcher:
    """One task per worker runs ``predict_proba`` on whatever requests queued up meanwhile.

    The model runs on the event loop itself: a hand-off to a thread measured 20 % fewer requests per
    second (the work is Python and holds the GIL anyway). To keep the loop responsive, one model call
    takes at most ``max_batch`` texts and the loop gets a turn between calls, so a 256-text request never
    blocks health checks or other requests for longer than one chunk.
    """

    def __init__(self, max_batch: int, measure: bool = True) -> None:
        self.max_batch = max_batch
        self.measure = measure
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._latency: tuple[str, Histogram] | None = None  # (model version, its INFERENCE_DURATION child)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inference-batcher")

    async def stop(self) -> None:
        """Finish queued work, then stop the loop and the thread."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def predict_proba(
        self, model: ServedModel, texts: list[str], on_result: OnResult | None = None
    ) -> NDArray[np.float64]:
        """Class probabilities for ``texts`` from ``model`` (rows in order; columns negative, positive).

        ``on_result`` gets the same rows first, in the step that computed them: the calls of one model call
        run one after the other before any of their callers resumes. If it raises, this call raises that.
        Not called for a caller that was cancelled meanwhile.
        """
        if self._task is None:
            raise RuntimeError("InferenceBatcher.start() was not called")
        future: asyncio.Future[NDArray[np.float64]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(model, texts, future, on_result))
        return await future

    def _take_batch(self, first: _Pending) -> list[_Pending]:
        batch, size = [first], len(first.texts)
        while size < self.max_batch and not self._queue.empty():
            nxt = self._queue._queue[0]  # type: ignore[attr-defined]  # peek: asyncio.Queue has no API for it
            if nxt.model is not first.model or size + len(nxt.texts) > self.max_batch:
                break
            batch.append(self._queue.get_nowait())
            size += len(nxt.texts)
        return batch

    def _call(self, model: ServedModel, texts: list[str]) -> NDArray[np.float64]:
        started = time.perf_counter()
        proba = model.predict_proba(texts)
        if self.measure:
            if self._latency is None or self._latency[0] != model.version:
                self._latency = (model.version, INFERENCE_DURATION.labels(model.version))
            WRITES.observe(self._latency[1], time.perf_counter() - started)
        return proba

    async def _predict_chunked(self, model: ServedModel, texts: list[str]) -> NDArray[np.float64]:
        if len(texts) <= self.max_batch:
            return self._call(model, texts)
        parts = []
        for start in range(0, len(texts), self.max_batch):
            parts.append(self._call(model, texts[start : start + self.max_batch]))
            await asyncio.sleep(0)
        return np.concatenate(parts)

    @staticmethod
    def _settle(item: _Pending, rows: NDArray[np.float64]) -> None:
        if item.on_result is not None:
            try:
                item.on_result(rows)
            except Exception as exc:  # the caller's own failure: it gets it, the batch goes on
                item.future.set_exception(exc)
                return
        item.future.set_result(rows)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            # One turn of the loop lets requests that are already parsed join this batch.
            await asyncio.sleep(0)
            batch = self._take_batch(first)
            texts = [text for item in batch for text in item.texts]
            try:
                proba = await self._predict_chunked(first.model, texts)
            except Exception as exc:  # a model failure fails these requests, never the batcher
                log.exception("inference_failed", model_version=first.model.version, texts=len(texts))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                start = 0
                for item in batch:
                    end = start + len(item.texts)
                    if not item.future.done():
                        self._settle(item, proba[start:end])
                    start = end
            finally:
                for _ in batch:
                    self._queue.task_done()
