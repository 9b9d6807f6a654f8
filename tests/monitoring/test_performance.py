"""Label-free accuracy estimation: the formula, the band's coverage, and how it fares on real text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.ml.data import Corpus, load_clothing
from app.ml.drift_reference import DriftReference
from app.ml.model import decide
from app.ml.registry import LoadedModel
from app.monitoring.performance import (
    AccuracyEstimate,
    dropped_below,
    estimate_accuracy,
    estimate_from_confidence,
    estimated_drop,
    reference_estimate,
)


def test_estimate_is_the_mean_confidence_and_the_band_the_bernoulli_variance() -> None:
    """P(positive) 0.9, 0.2, 0.6, 0.5: confidences 0.9, 0.8, 0.6, 0.5; the band clips at 1."""
    found = estimate_accuracy([0.9, 0.2, 0.6, 0.5])
    half_width = 1.959963984540054 * math.sqrt(0.09 + 0.16 + 0.24 + 0.25) / 4
    assert found.estimate == pytest.approx(0.7)
    assert found.low == pytest.approx(0.7 - half_width) and found.low == pytest.approx(0.2785, abs=1e-4)
    assert found.high == 1.0  # 0.7 + 0.42 clipped
    assert found.window_size == 4 and found.method == "confidence"


def test_band_narrows_with_the_square_root_of_the_window() -> None:
    """Four times the rows at the same confidences: half the band, the same estimate."""
    small = estimate_accuracy([0.1, 0.8, 0.95, 0.3] * 25)
    large = estimate_accuracy([0.1, 0.8, 0.95, 0.3] * 100)
    assert small.estimate == pytest.approx(0.8375) and large.estimate == pytest.approx(0.8375)
    assert (large.high - large.low) == pytest.approx((small.high - small.low) / 2)


def test_a_label_and_its_mirror_give_the_same_estimate() -> None:
    """Only the confidence in the predicted label counts, not which label it is."""
    assert estimate_accuracy([0.1, 0.35]) == estimate_accuracy([0.9, 0.65])


def test_realised_accuracy_of_calibrated_windows_falls_in_the_band_95_percent_of_the_time() -> None:
    """Outcomes drawn as calibration says: the estimate is unbiased and the band covers 95 % (1.5 % slack)."""
    rng = np.random.default_rng(0)
    windows, size = 2000, 500
    p_positive = rng.beta(0.7, 0.7, size=(windows, size))  # U-shaped, as a sentiment model's probabilities
    confidence = np.maximum(p_positive, 1 - p_positive)
    correct = rng.random((windows, size)) < confidence
    estimates = [estimate_accuracy(row) for row in p_positive]
    realised = correct.mean(axis=1)
    covered = np.mean([e.low <= r <= e.high for e, r in zip(estimates, realised, strict=True)])
    assert 0.935 <= covered <= 0.965
    assert abs(np.mean([e.estimate for e in estimates]) - realised.mean()) < 0.002


def test_drop_is_measured_in_points_below_the_reference() -> None:
    """Reference 0.80, window 0.74: a 6-point drop crosses 5 points, not 7; a window above it drops by < 0."""
    reference = AccuracyEstimate(0.80, 0.78, 0.82, 1000)
    window = AccuracyEstimate(0.74, 0.70, 0.78, 500)
    assert estimated_drop(window, reference) == pytest.approx(0.06)
    assert dropped_below(window, reference, 5) and not dropped_below(window, reference, 7)
    assert not dropped_below(reference, window, 0) and estimated_drop(reference, window) < 0
    with pytest.raises(ValueError, match="points"):
        dropped_below(window, reference, -1)


@pytest.mark.parametrize(
    "p_positive", [[], [0.2, 1.2], [-0.1], [0.4, float("nan")]], ids=["empty", "above_1", "below_0", "nan"]
)
def test_a_window_that_is_not_probabilities_is_refused(p_positive: list[float]) -> None:
    """An estimate from something else would be silently wrong."""
    with pytest.raises(ValueError):
        estimate_accuracy(p_positive)


def test_confidence_below_one_half_is_refused() -> None:
    """P(positive) passed where confidence is expected would underestimate by up to half."""
    with pytest.raises(ValueError, match="confidence"):
        estimate_from_confidence([0.9, 0.2])


def test_the_estimate_is_json_ready() -> None:
    """As /v1/drift and the drift-check record carry it."""
    found = estimate_accuracy([0.9, 0.7])
    assert json.loads(json.dumps(found.to_dict())) == {
        "estimate": pytest.approx(0.8),
        "low": found.low,
        "high": found.high,
        "window_size": 2,
        "method": "confidence",
    }


# -- a real small model on real text ------------------------------------------------------------------------


def test_reference_estimate_is_the_held_out_reference_mean_confidence_near_the_test_accuracy(
    current: LoadedModel, reference: DriftReference
) -> None:
    """The stored confidences give the reference figure; calibration keeps it within 4 points of test accuracy."""
    found = reference_estimate(reference)
    assert found.window_size == reference.size
    assert found.estimate == pytest.approx(float(reference.confidence.mean()))
    assert abs(found.estimate - current.metadata["metrics"]["accuracy"]) < 0.04


def test_in_domain_estimate_is_within_3_points_of_realised_accuracy(
    current: LoadedModel, rotten_tomatoes: Corpus, small_corpus: Corpus
) -> None:
    """3,000 Rotten Tomatoes rows the calibrated model never saw: estimated and realised accuracy agree."""
    used = set(small_corpus.texts)
    rows = [i for i, text in enumerate(rotten_tomatoes.texts) if text not in used][:3000]
    p = current.model.p_positive([rotten_tomatoes.texts[i] for i in rows])
    realised = float((decide(p) == rotten_tomatoes.labels[rows]).mean())
    assert abs(estimate_accuracy(p).estimate - realised) < 0.03


def test_clothing_reviews_break_calibration_and_the_estimate_overshoots(current: LoadedModel) -> None:
    """The documented failure: on another domain the model stays confident and is wrong far more often."""
    clothing = load_clothing()
    rows = np.random.default_rng(0).permutation(len(clothing))[:2000]
    p = current.model.p_positive([clothing.texts[i] for i in rows])
    realised = float((decide(p) == clothing.labels[rows]).mean())
    found = estimate_accuracy(p)
    assert found.estimate - realised > 0.15 and not found.low <= realised <= found.high
