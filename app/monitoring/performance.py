"""Label-free accuracy estimation: the accuracy a window of predictions should have if the model is calibrated.

Confidence-based performance estimation. A prediction's confidence is ``c = max(p, 1 - p)`` for its
P(positive) ``p`` (:func:`app.ml.model.confidence_of`, the probability of the label the decision rule
picks). If the model is calibrated on the traffic, row ``i`` is right with probability ``c_i``, independently
of the other rows, so the realised accuracy ``A`` of a window of ``n`` rows (a Poisson-binomial share) has

    E[A] = (1 / n) * sum(c_i)                      (the estimate)
    Var[A] = (1 / n^2) * sum(c_i * (1 - c_i))       (the sampling variance of the per-row outcomes)

and the band is ``E[A] +- z * sqrt(Var[A])`` with ``z`` = 1.96 (95 %, the normal approximation, which is
close for the windows the monitor tests, a few hundred rows), clipped to [0, 1]. The band is where the
window's realised accuracy should fall; it holds only the sampling noise of the outcomes, not the error of
the probabilities themselves.

Where it fails: the estimate is only as good as the calibration on the *new* traffic. Covariate shift that
leaves P(label | text) alone keeps it honest; a concept shift (the same words meaning something else), a
label-prior shift (calibration was fitted at the training prior) or text the model has no features for
(confidently wrong) breaks it, usually towards over-estimating. ``bench/estimated_accuracy.py`` measures
the error in-domain and on real shifts. Comparing a window's estimate with the same estimate on the
version's held-out reference (:func:`reference_estimate`) cancels a constant calibration bias; the drop
between the two is what alerting and the retrain trigger read (:func:`estimated_drop`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.ml.drift_reference import DriftReference
from app.ml.model import confidence_of

METHOD = "confidence"
"""The estimator's name in :attr:`AccuracyEstimate.method`: mean confidence under calibration (CBPE)."""
Z_95 = 1.959963984540054
"""Standard normal quantile of 0.975: a two-sided 95 % band."""


@dataclass(frozen=True)
class AccuracyEstimate:
    """Estimated accuracy of a window of predictions, with the 95 % band its realised accuracy should fall in.

    Values are shares in [0, 1] (0.81, not 81). ``window_size`` is the number of predictions behind it.
    """

    estimate: float
    low: float
    high: float
    window_size: int
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as ``/v1/drift`` and the drift-check record store them."""
        return asdict(self)


def estimate_from_confidence(
    confidence: NDArray[np.float64] | Sequence[float], *, z: float = Z_95, method: str = METHOD
) -> AccuracyEstimate:
    """The estimate and band from each prediction's confidence (probability of the predicted label).

    Raises ``ValueError`` for an empty window or a confidence outside [0.5, 1] (or NaN): a probability
    that is not one means the caller passed something else, and an estimate from it would be silently wrong.
    """
    c = np.asarray(confidence, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"an accuracy estimate needs a non-empty 1-d window, got shape {c.shape}")
    if not np.all((c >= 0.5) & (c <= 1.0)):  # also False for NaN
        raise ValueError("confidence must lie in [0.5, 1]: pass max(p, 1 - p), or P(positive) to estimate_accuracy")
    n = c.size
    estimate = float(c.mean())
    half_width = z * math.sqrt(float(np.sum(c * (1.0 - c)))) / n
    return AccuracyEstimate(
        estimate=estimate,
        low=max(0.0, estimate - half_width),
        high=min(1.0, estimate + half_width),
        window_size=n,
        method=method,
    )


def estimate_accuracy(p_positive: NDArray[np.float64] | Sequence[float], *, z: float = Z_95) -> AccuracyEstimate:
    """The estimated accuracy of a window from the model's P(positive) per prediction (see the module doc).

    Raises ``ValueError`` for an empty window or a value outside [0, 1] (or NaN).
    """
    p = np.asarray(p_positive, dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("P(positive) must lie in [0, 1]")
    return estimate_from_confidence(confidence_of(p), z=z)


def reference_estimate(reference: DriftReference, *, z: float = Z_95) -> AccuracyEstimate:
    """The same estimate on the version's drift reference: held-out, in-domain rows no fitted step saw.

    This is the figure a live window's estimate is compared with ("below the reference by X points"). The
    version's realised test accuracy is in its metadata (``metrics.accuracy``, on the whole holdout); the
    gap between the two is the calibration error at training time, which the comparison cancels.
    """
    return estimate_from_confidence(reference.confidence, z=z)


def estimated_drop(window: AccuracyEstimate, reference: AccuracyEstimate) -> float:
    """How far the window's estimate lies below the reference's, as a share (0.05 is 5 points; negative: above)."""
    return reference.estimate - window.estimate


def dropped_below(window: AccuracyEstimate, reference: AccuracyEstimate, points: float) -> bool:
    """Whether the window's estimated accuracy is at least ``points`` percentage points below the reference's.

    Compares the estimates themselves, not the bands: the band is the noise of the realised accuracy around
    the estimate, while the estimate of a 500-row in-domain window moves by about a point
    (``bench/estimated_accuracy.py`` reports how often each threshold is crossed in-domain).
    """
    if points < 0:
        raise ValueError(f"points must be >= 0, got {points}")
    return estimated_drop(window, reference) >= points / 100.0
