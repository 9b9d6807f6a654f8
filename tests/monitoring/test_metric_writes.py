"""The request path's batched metric writes expose exactly what the public methods would, once the loop
iteration that gathered them ends."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.monitoring.metric_writes import LoopBatchedWrites
from app.monitoring.metrics import CONFIDENCE_BUCKETS, LATENCY_BUCKETS, LENGTH_BUCKETS


def samples(*metrics: Counter | Gauge | Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in metrics
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def twins(buckets: tuple[float, ...]) -> tuple[Histogram, Histogram]:
    registry = CollectorRegistry()
    return (
        Histogram("direct", "direct", buckets=buckets, registry=registry),
        Histogram("batched", "batched", buckets=buckets, registry=registry),
    )


def renamed(values: dict[tuple[str, str], float], old: str, new: str) -> dict[tuple[str, str], float]:
    return {(name.replace(old, new), le): value for (name, le), value in values.items()}


@pytest.mark.parametrize(
    ("buckets", "values"),
    [
        (CONFIDENCE_BUCKETS, [*np.random.default_rng(0).uniform(0.5, 1.0, 500).tolist(), 0.55, 0.6, 1.0]),
        (LENGTH_BUCKETS, [0, 10, 11, 25, 250, 251, 5000, 5001, 99_999, *range(0, 3000, 7)]),
        (LENGTH_BUCKETS, []),
        (CONFIDENCE_BUCKETS, [0.7, 0.99, 0.55]),  # below the numpy path's threshold
        (LATENCY_BUCKETS, [0.0005, 0.0004, 12.0, math.inf, -1.0]),
    ],
)
def test_batched_observations_equal_observe_one_by_one(buckets: tuple[float, ...], values: list[float]) -> None:
    direct, batched = twins(buckets)
    writes = LoopBatchedWrites()
    for value in values:
        direct.observe(value)
    writes.observe_many(batched, values[: len(values) // 2])
    for value in values[len(values) // 2 :]:
        writes.observe(batched, value)
    expected = samples(direct)
    got = renamed(samples(batched), "batched", "direct")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_nan_is_in_no_bucket_as_with_observe() -> None:
    direct, batched = twins(CONFIDENCE_BUCKETS)
    direct.observe(math.nan)
    LoopBatchedWrites().observe(batched, math.nan)
    many, _ = twins(CONFIDENCE_BUCKETS)
    LoopBatchedWrites().observe_many(many, [math.nan] * 10)
    for histogram in (direct, batched, many):
        counts = {le: v for (name, le), v in samples(histogram).items() if name.endswith("_bucket")}
        assert set(counts.values()) == {0.0}


def test_writes_land_at_the_end_of_the_loop_iteration_and_cancelling_ones_are_skipped() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("in_progress", "in progress", registry=registry)
    counter = Counter("served", "served", ["sentiment"], registry=registry)
    histogram = Histogram("latency", "latency", buckets=LATENCY_BUCKETS, registry=registry)
    writes = LoopBatchedWrites()
    written: list[object] = []

    async def burst() -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
        for _ in range(14):
            writes.inc(gauge)
        for _ in range(14):
            writes.inc(gauge, -1.0)
            writes.inc(counter.labels("positive"))
            writes.observe(histogram, 0.003)
        writes.inc(gauge)  # one request still in progress
        during = samples(gauge, counter, histogram)
        pending = dict(writes._pending)
        written.extend(value for value, amount in pending.items() if amount)
        await asyncio.sleep(0)  # the iteration ends: the writes land
        return during, samples(gauge, counter, histogram)

    during, after = asyncio.run(burst())
    assert during[("in_progress", "")] == 0.0
    assert during[("served_total", "")] == 0.0
    assert after[("in_progress", "")] == 1.0
    assert after[("served_total", "")] == 14.0
    assert after[("latency_bucket", "0.005")] == 14.0
    assert after[("latency_sum", "")] == pytest.approx(14 * 0.003)
    assert len(written) == 4  # the gauge, the counter, one bucket, the sum: not 14 x 5 writes


def test_outside_a_loop_writes_are_immediate() -> None:
    registry = CollectorRegistry()
    counter = Counter("served", "served", registry=registry)
    LoopBatchedWrites().inc(counter, 3)
    assert samples(counter)[("served_total", "")] == 3.0


def test_with_an_interval_writes_land_that_long_after_the_first_and_an_early_flush_writes_them_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("served", "served", registry=registry)
    histogram = Histogram("latency", "latency", buckets=LATENCY_BUCKETS, registry=registry)
    writes = LoopBatchedWrites(interval=1.0)
    seen: dict[str, float] = {}

    async def traffic() -> None:
        writes.inc(counter)
        await asyncio.sleep(0.05)  # many loop iterations later: still gathered
        writes.inc(counter)
        writes.observe(histogram, 0.003)
        await asyncio.sleep(0.05)
        seen["before the interval"] = samples(counter)[("served_total", "")]
        await asyncio.sleep(1.2)
        seen["after the interval"] = samples(counter)[("served_total", "")]
        writes.inc(counter, 5)
        writes.flush()  # a scrape by this worker: written now, the scheduled write is cancelled
        seen["flushed early"] = samples(counter)[("served_total", "")]
        await asyncio.sleep(0.3)
        seen["later"] = samples(counter)[("served_total", "")]
        seen["histogram"] = samples(histogram)[("latency_count", "")]

    asyncio.run(traffic())
    assert seen["before the interval"] == 0.0
    assert seen["after the interval"] == 2.0
    assert seen["flushed early"] == 7.0
    assert seen["later"] == 7.0
    assert seen["histogram"] == 1.0
    assert writes._scheduled is None
