"""Loaded by the Python processes of a service that ``bench/monitoring_ablation.py`` starts (this folder is first
on their ``PYTHONPATH``): removes the monitoring pieces named in ``BENCH_ABLATE`` (comma-separated) from the web
workers, so the benchmark can measure what each costs in place. Never on a service's path outside that benchmark.

- ``flush``: the recorder's database write (its rows count as written, nothing is inserted);
- ``spool``: the crash spool's appends (rows are buffered without a spool copy);
- ``metrics``: the metric writes the request path gathers per loop iteration;
- ``record``: the predictor's recording (no rows staged, counted, spooled or buffered);
- ``measure``: the request and model-call latency histograms and the in-progress gauge.
"""

from __future__ import annotations

import os
from typing import Any


def _ablate(pieces: set[str]) -> None:
    if "flush" in pieces:
        from app.storage.recorder import PredictionRecorder

        async def write(self: PredictionRecorder, chunk: list[Any]) -> bool:
            self._settle(chunk, bytearray([1] * len(chunk)))
            return True

        PredictionRecorder._write = write  # type: ignore[method-assign]
    if "spool" in pieces:
        from app.monitoring.spool import NOT_SPOOLED, PredictionSpool

        PredictionSpool.append = lambda self, columns, rows: NOT_SPOOLED  # type: ignore[method-assign]
    if "metrics" in pieces:
        from app.monitoring.metric_writes import LoopBatchedWrites

        LoopBatchedWrites._add = lambda self, value, amount: None  # type: ignore[method-assign]
    if "record" in pieces:
        from app.serving.predictor import Predictor

        init = Predictor.__init__
        Predictor.__init__ = lambda self, models, batcher, recorder: init(self, models, batcher, None)  # type: ignore[method-assign]
    if "measure" in pieces:
        from app.api.middleware import AccessLogMiddleware
        from app.serving.batcher import InferenceBatcher

        access_init, batcher_init = AccessLogMiddleware.__init__, InferenceBatcher.__init__
        AccessLogMiddleware.__init__ = lambda self, app, measure=True: access_init(self, app, False)  # type: ignore[method-assign]
        InferenceBatcher.__init__ = lambda self, max_batch, measure=True: batcher_init(self, max_batch, False)  # type: ignore[method-assign]


_ablate(set(filter(None, os.environ.get("BENCH_ABLATE", "").split(","))))
