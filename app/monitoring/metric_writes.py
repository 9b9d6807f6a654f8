"""Metric writes of the request path, gathered in each web worker and written once per touched value.

In multiprocess mode every counter increment, gauge change and histogram observation is a locked write to a
memory-mapped file (about 1 us each, with a ``getpid`` system call). A web worker gathers the writes of its
requests for ``SENTIMENT_METRICS_WRITE_SECONDS`` (0.25 s by default) and then writes each touched value once:
the ~8 writes of every single-text request become a few per interval for all of them. The in-progress gauge's
+1 and -1 of requests that start and end within one interval cancel out; the latencies of hundreds of requests
touch a few buckets and one sum. With 0 the writes of one event-loop iteration are written at its end.

What that costs. A scrape sees another worker's counts at most one interval late (the worker that serves
``/metrics`` writes its own first); Prometheus scrapes every few seconds or more, so a scrape misses at most
the last quarter second of other workers' traffic and counts it at the next. A worker killed by SIGKILL loses
at most one interval's counts (its predictions are all in the prediction log: :mod:`app.storage.recorder`); a
graceful shutdown writes them. Outside a running loop (a CLI, a test) writes are immediate.

This reads prometheus_client's internals (a child's ``_value``, a histogram's ``_upper_bounds``, ``_buckets``
and ``_sum``; the version is pinned in requirements.txt); ``tests/monitoring/test_metric_writes.py`` checks the
exposition against the public methods value by value.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_BULK_FROM = 80
"""Lists of at least this many values are bucketed with numpy; below it numpy's fixed cost (about 10 us) exceeds
the loop's (14 values, a model call's usual rows under load: 8.7 us with numpy, 5.0 us without; even at about 80)."""


class LoopBatchedWrites:
    """Counter increments, gauge deltas and histogram observations, written ``interval`` seconds after the first
    of them (0: at the end of the loop iteration)."""

    def __init__(self, interval: float = 0.0) -> None:
        self.interval = interval
        self._pending: dict[Any, float] = {}  # a metric value object -> amount to add
        self._scheduled: asyncio.Handle | None = None  # the flush to come

    def _add(self, value: Any, amount: float) -> None:
        pending = self._pending
        pending[value] = pending.get(value, 0.0) + amount
        if self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: write now
                self.flush()
                return
            if self.interval > 0:
                self._scheduled = loop.call_later(self.interval, self.flush)
            else:
                self._scheduled = loop.call_soon(self.flush)

    def inc(self, metric: Counter | Gauge, amount: float = 1.0) -> None:
        """``metric.inc(amount)`` (a gauge may take a negative amount) for an unlabelled metric or a child."""
        self._add(metric._value, amount)

    def observe(self, histogram: Histogram, value: float) -> None:
        """``histogram.observe(value)``: the first bucket whose bound is >= ``value`` (none for NaN) and the sum."""
        bounds = histogram._upper_bounds
        if value <= bounds[-1]:  # the last bound is +Inf: false only for NaN, which observe() leaves in no bucket
            self._add(histogram._buckets[bisect_left(bounds, value)], 1.0)
        self._add(histogram._sum, value)

    def observe_many(self, histogram: Histogram, values: Sequence[float]) -> None:
        """``observe`` for each value, each touched bucket added to once (a long list is bucketed with numpy)."""
        bounds = histogram._upper_bounds
        if len(values) >= _BULK_FROM:
            import numpy as np  # here: the supervisor and gunicorn's master import this module, and never call it

            per_index = np.bincount(np.searchsorted(bounds, values, side="left")).tolist()[: len(bounds)]
            counted: Iterable[tuple[int, int]] = enumerate(per_index)
            total = float(np.sum(values))  # NaN sorts past the last bound: in no bucket, in the sum
        else:
            per_bucket: dict[int, int] = {}
            total = 0.0
            for value in values:
                if value <= bounds[-1]:  # false only for NaN
                    bucket = bisect_left(bounds, value)
                    per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
                total += value
            counted = per_bucket.items()
        for bucket, count in counted:
            if count:
                self._add(histogram._buckets[bucket], float(count))
        self._add(histogram._sum, total)

    def flush(self) -> None:
        """Write every gathered amount (each touched value once); amounts that cancelled out are skipped."""
        if self._scheduled is not None:
            self._scheduled.cancel()  # called early (a scrape, shutdown): the scheduled flush would find nothing
            self._scheduled = None
        pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            if amount:
                value.inc(amount)


WRITES = LoopBatchedWrites()
"""The process's writer: the access-log middleware and the predictor share it, so their writes meet. A web
worker's lifespan sets its interval from the settings (:func:`app.services.build_services`)."""
