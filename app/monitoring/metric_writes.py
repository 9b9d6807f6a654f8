"""Metric writes of the request path, gathered per event-loop iteration and written once per touched value.

In multiprocess mode every counter increment, gauge change and histogram observation is a locked write to a
memory-mapped file (about 1 us each). A web worker answers its requests in bursts: the batcher wakes every
caller of one model call in the same loop iteration, and their responses end together. Gathering the writes of
an iteration and writing each touched value once at its end (``loop.call_soon``) turns the ~8 writes of every
single-text request into a few per burst: the in-progress gauge's +1 and -1 of requests starting and ending in
one iteration cancel out, the latencies of 14 requests touch 2-3 buckets and one sum.

Nothing waits for a scrape: the writes land before the loop handles anything that arrived after them, so
``/metrics`` (served by any worker) never lags behind more than the iteration in progress, and a worker killed
by SIGKILL loses at most that iteration's counts. Outside a running loop (a CLI, a test) writes are immediate.

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
    """Counter increments, gauge deltas and histogram observations, written at the end of the loop iteration."""

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}  # a metric value object -> amount to add
        self._scheduled = False

    def _add(self, value: Any, amount: float) -> None:
        pending = self._pending
        pending[value] = pending.get(value, 0.0) + amount
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()
                return
            self._scheduled = True

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
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            if amount:
                value.inc(amount)


WRITES = LoopBatchedWrites()
"""The process's writer: the access-log middleware and the predictor share it, so a burst's writes meet."""
