"""Simulated traffic for tests and benchmarks: real predictions of a real model, written to the predictions table."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.ml.labels import LABELS
from app.storage.predictions import PredictionRepository


def log_predictions(
    store: PredictionRepository,
    pipeline: Any,
    version: str,
    texts: Sequence[str],
    labels: NDArray[np.int64] | None = None,
    *,
    start: float | None = None,
    source: str = "default",
) -> list[dict[str, Any]]:
    """Log ``pipeline``'s predictions of ``texts`` as ``version`` made them; with ``labels``, label them too,
    as sent by the feedback token named ``source``."""
    proba = pipeline.predict_proba(list(texts))[:, 1]
    start = time.time() if start is None else start
    rows = [
        {
            "id": uuid.uuid4().hex,
            "created_at": start + i * 1e-4,
            "text": t,
            "text_length": len(t),
            "sentiment": LABELS[int(p >= 0.5)],
            "confidence": float(max(p, 1 - p)),
            "p_positive": float(p),
            "model_version": version,
            "latency_ms": 1.0,
        }
        for i, (t, p) in enumerate(zip(texts, proba, strict=True))
    ]
    store.insert_predictions(rows)
    if labels is not None:
        for row, label in zip(rows, labels, strict=True):
            store.set_label(row["id"], LABELS[int(label)], now=start + 1, source=source)
    return rows
