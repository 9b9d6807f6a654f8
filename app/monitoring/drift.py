"""Drift tests of a live window against a model version's held-out reference.

Five tests, each sensitive to a different kind of change:

- ``mmd``: alibi-detect's ``MMDDrift`` (PyTorch backend, permutation test) on the model's reduced TF-IDF
  features: what the texts are about and how they are written;
- ``length``: two-sample Kolmogorov-Smirnov test of text length in characters;
- ``length_tail``: exact binomial test of the share of texts outside the reference's 1st-99th length
  percentiles (KS and MMD barely see a small minority of very different texts; this counts them);
- ``confidence``: KS test of the model's confidence (the model meeting text it is unsure about);
- ``label_mix``: chi-square test of the share of texts called positive (a change of label prior).

The verdict is drift when any test's p-value falls below ``p_value / 5`` (Bonferroni), so the chance of
a false alarm on in-domain traffic stays at most ``p_value`` for the five tests together.

This module imports torch through alibi-detect: only the drift monitor process imports it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import binomtest, chi2_contingency, ks_2samp

from app.ml.drift_reference import DriftReference, embed

TESTS = ("mmd", "length", "length_tail", "confidence", "label_mix")
TAIL_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class DriftResult:
    """One drift check: the verdict and every test's numbers (stored, exported and served as is)."""

    checked_at: float
    model_version: str
    status: str  # "drift", "no_drift" or "insufficient_data"
    drift: bool
    window_size: int
    score: float | None = None  # MMD distance
    p_value: float | None = None  # MMD permutation-test p-value
    threshold: float | None = None  # MMD distance at which the test rejects at the corrected level
    confidence_mean: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


class DriftDetector:
    """The tests for one model version, with the MMD reference kernel configured once."""

    def __init__(
        self,
        model_version: str,
        pipeline: Any,
        reference: DriftReference,
        *,
        p_value: float,
        permutations: int,
        window_size: int,
    ) -> None:
        from alibi_detect.cd import MMDDrift  # torch: only in the monitor process

        self.model_version = model_version
        self.pipeline = pipeline
        self.reference = reference
        self.p_value = p_value
        self.corrected = p_value / len(TESTS)
        self.window_size = window_size
        self.mmd = MMDDrift(
            reference.embeddings, backend="pytorch", p_val=self.corrected, n_permutations=permutations, device="cpu"
        )

    def check(self, rows: list[dict[str, Any]], now: float | None = None) -> DriftResult:
        """Test the latest window (rows with text, confidence, p_positive), or say it is not full yet."""
        now = now or time.time()
        confidence = np.array([r["confidence"] for r in rows], dtype=np.float64)
        if len(rows) < self.window_size:
            return DriftResult(
                now,
                self.model_version,
                "insufficient_data",
                False,
                len(rows),
                confidence_mean=float(confidence.mean()) if len(rows) else None,
                details={"needed": self.window_size, "reference_size": self.reference.size},
            )
        texts = [r["text"] for r in rows]
        return self.test(
            embed(self.pipeline, self.reference.reducer, texts),
            np.array([len(t) for t in texts], dtype=np.float64),
            confidence,
            np.array([r["p_positive"] for r in rows], dtype=np.float64),
            now,
        )

    def test(
        self,
        embeddings: NDArray[np.float32],
        lengths: NDArray[np.float64],
        confidence: NDArray[np.float64],
        p_positive: NDArray[np.float64],
        now: float | None = None,
    ) -> DriftResult:
        """All five tests on a full window given as arrays (the benchmarks embed their texts once)."""
        size = len(lengths)
        mmd = self.mmd.predict(embeddings)["data"]
        positives = int((p_positive >= 0.5).sum())
        ref_pos = round(self.reference.positive_rate * self.reference.size)
        table = np.array([[positives, size - positives], [ref_pos, self.reference.size - ref_pos]])
        low, high = np.percentile(self.reference.lengths, TAIL_PERCENTILES)
        ref_tail = float(((self.reference.lengths < low) | (self.reference.lengths > high)).mean())
        tail = int(((lengths < low) | (lengths > high)).sum())
        p_values = {
            "mmd": float(mmd["p_val"]),
            "length": float(ks_2samp(lengths, self.reference.lengths).pvalue),
            "length_tail": float(
                binomtest(tail, size, max(ref_tail, 1.0 / self.reference.size), alternative="greater").pvalue
            ),
            "confidence": float(ks_2samp(confidence, self.reference.confidence).pvalue),
            "label_mix": float(chi2_contingency(table).pvalue) if table.sum(axis=0).all() else 1.0,
        }
        drift = min(p_values.values()) < self.corrected
        return DriftResult(
            checked_at=now or time.time(),
            model_version=self.model_version,
            status="drift" if drift else "no_drift",
            drift=drift,
            window_size=size,
            score=float(mmd["distance"]),
            p_value=p_values["mmd"],
            threshold=float(mmd["distance_threshold"]),
            confidence_mean=float(confidence.mean()),
            details={
                "p_values": p_values,
                "corrected_threshold": self.corrected,
                "tests_rejecting": sorted(k for k, v in p_values.items() if v < self.corrected),
                "positive_rate": positives / size,
                "length_tail_rate": tail / size,
                "reference_length_tail_rate": ref_tail,
                "reference_positive_rate": self.reference.positive_rate,
                "mean_length": float(lengths.mean()),
                "reference_mean_length": float(self.reference.lengths.mean()),
                "reference_size": self.reference.size,
            },
        )
