"""Metric helpers: bulk histogram observations equal observe() called value by value."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from app.monitoring.metrics import CONFIDENCE_BUCKETS, LENGTH_BUCKETS, observe_many


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name.rsplit("_", 1)[-1], s.labels.get("le", "")): s.value
        for metric in histogram.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize(
    ("buckets", "values"),
    [
        (CONFIDENCE_BUCKETS, [*np.random.default_rng(0).uniform(0.5, 1.0, 500).tolist(), 0.55, 0.6, 1.0]),
        (LENGTH_BUCKETS, [0, 10, 11, 25, 250, 251, 5000, 5001, 99_999, *range(0, 3000, 7)]),
        (LENGTH_BUCKETS, []),
        (CONFIDENCE_BUCKETS, [0.7, 0.99]),  # below the bulk path's threshold
    ],
)
def test_observe_many_equals_observe_one_by_one(buckets: tuple[float, ...], values: list[float]) -> None:
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "one", buckets=buckets, registry=registry)
    bulk = Histogram("bulk", "bulk", buckets=buckets, registry=registry)
    for value in values:
        one_by_one.observe(value)
    observe_many(bulk, values)
    expected, got = samples(one_by_one), samples(bulk)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
