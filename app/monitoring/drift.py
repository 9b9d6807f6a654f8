"""Drift tests of a live window against a model version's held-out reference.

Each test is one :class:`DriftTest` subclass listed in :data:`TESTS`, each sensitive to a different kind
of change:

- ``mmd``: maximum mean discrepancy permutation test on the model's reduced features (what the texts are
  about and how they are written), by one of the engines of :mod:`app.monitoring.mmd`: alibi-detect's
  ``MMDDrift`` (PyTorch backend, the default) or the project's own numpy implementation (``builtin``);
- ``length``: two-sample Kolmogorov-Smirnov test of text length in characters;
- ``length_tail``: exact binomial test of the share of texts outside the reference's 1st-99th length
  percentiles (KS and MMD barely see a small minority of very different texts; this counts them);
- ``confidence``: KS test of the model's confidence (the model meeting text it is unsure about);
- ``label_mix``: chi-square test of the share of texts called positive (a change of label prior).

The verdict is drift when any test's p-value falls below ``p_value / len(tests)`` (Bonferroni), so the
chance of a false alarm on in-domain traffic stays at most ``p_value`` for the whole family. Adding a test
is one class and one entry in :data:`TESTS`: the divisor, the stored p-values and the exported
``sentiment_drift_test_p_value{test}`` labels follow the list.

Importing this module is cheap; building a :class:`DriftDetector` with the ``alibi-detect`` engine
imports torch, which only the drift monitor process (and the benchmarks) do. The ``builtin`` engine never
imports torch or alibi-detect.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from scipy.stats import binomtest, chi2_contingency, ks_2samp

from app.ml.drift_reference import DriftReference, embed
from app.ml.model import SentimentModel, decide
from app.monitoring.mmd import DEFAULT_ENGINE, build_engine
from app.storage.drift_checks import DriftCheck
from app.storage.predictions import WindowRow

TAIL_PERCENTILES = (1.0, 99.0)
HEADLINE_TEST = "mmd"
"""The test whose distance, p-value and threshold fill :class:`DriftResult`'s ``score``, ``p_value``, ``threshold``."""


@dataclass(frozen=True)
class Window:
    """One full window of predictions as arrays (the benchmarks embed their texts once)."""

    embeddings: NDArray[np.float32]  # (n, components), as :func:`app.ml.drift_reference.embed` makes them
    lengths: NDArray[np.float64]  # characters per text
    confidence: NDArray[np.float64]  # the model's confidence per text
    p_positive: NDArray[np.float64]  # the model's P(positive) per text

    @property
    def size(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class Outcome:
    """What one test found: its p-value (before correction), statistic and figures for ``details``."""

    p_value: float
    statistic: float
    threshold: float | None = None  # the statistic at which the test rejects at the corrected level, if known
    figures: dict[str, float] = field(default_factory=dict)


class DriftTest(ABC):
    """One statistical test of a window against the reference, set up once per model version."""

    name: ClassVar[str]
    """Key in ``details["p_values"]`` and value of the exported ``test`` label."""

    def __init__(
        self,
        reference: DriftReference,
        *,
        level: float,
        permutations: int,
        engine: str = DEFAULT_ENGINE,
        seed: int = 0,
    ) -> None:
        """``level`` is the corrected significance level; ``permutations``, ``engine`` (an
        :data:`app.monitoring.mmd.ENGINES` name) and ``seed`` are for the tests that use them."""
        self.reference = reference
        self.level, self.permutations, self.engine_name, self.seed = level, permutations, engine, seed
        self.prepare()

    def prepare(self) -> None:  # noqa: B027  a hook: most tests need nothing beyond the reference
        """Set up, once per model version, what :meth:`run` needs beyond the reference (nothing by default)."""

    @abstractmethod
    def run(self, window: Window) -> Outcome:
        """The test of ``window`` against ``self.reference``."""


class MMDTest(DriftTest):
    """Maximum mean discrepancy of the reduced features (permutation test, on CPU, by the chosen engine)."""

    name = "mmd"

    def prepare(self) -> None:
        embeddings = self.reference.embeddings
        self.engine = build_engine(
            self.engine_name, embeddings, level=self.level, permutations=self.permutations, seed=self.seed
        )

    def run(self, window: Window) -> Outcome:
        p_value, distance, threshold = self.engine.score(window.embeddings)
        return Outcome(p_value, distance, threshold)


class LengthTest(DriftTest):
    """Two-sample KS test of text length."""

    name = "length"

    def run(self, window: Window) -> Outcome:
        ks = ks_2samp(window.lengths, self.reference.lengths)
        figures = {
            "mean_length": float(window.lengths.mean()),
            "reference_mean_length": float(self.reference.lengths.mean()),
        }
        return Outcome(float(ks.pvalue), float(ks.statistic), figures=figures)


class LengthTailTest(DriftTest):
    """One-sided binomial test of the share of texts outside the reference's 1st-99th length percentiles."""

    name = "length_tail"

    def run(self, window: Window) -> Outcome:
        reference = self.reference
        low, high = np.percentile(reference.lengths, TAIL_PERCENTILES)
        reference_rate = float(((reference.lengths < low) | (reference.lengths > high)).mean())
        tail = int(((window.lengths < low) | (window.lengths > high)).sum())
        # A reference without tail texts still expects one in `size`: zero would make any tail text fatal.
        expected = max(reference_rate, 1.0 / reference.size)
        p_value = float(binomtest(tail, window.size, expected, alternative="greater").pvalue)
        figures = {"length_tail_rate": tail / window.size, "reference_length_tail_rate": reference_rate}
        return Outcome(p_value, tail / window.size, figures=figures)


class ConfidenceTest(DriftTest):
    """Two-sample KS test of the model's confidence."""

    name = "confidence"

    def run(self, window: Window) -> Outcome:
        ks = ks_2samp(window.confidence, self.reference.confidence)
        return Outcome(float(ks.pvalue), float(ks.statistic))


class LabelMixTest(DriftTest):
    """Chi-square test of the share called positive (by the model's decision rule) against the reference's."""

    name = "label_mix"

    def run(self, window: Window) -> Outcome:
        reference = self.reference
        positives = int(decide(window.p_positive).sum())
        reference_positives = round(reference.positive_rate * reference.size)
        table = np.array(
            [[positives, window.size - positives], [reference_positives, reference.size - reference_positives]]
        )
        figures = {"positive_rate": positives / window.size, "reference_positive_rate": reference.positive_rate}
        if not table.sum(axis=0).all():  # everything on one side in both: no evidence either way
            return Outcome(1.0, 0.0, figures=figures)
        chi2 = chi2_contingency(table)
        return Outcome(float(chi2.pvalue), float(chi2.statistic), figures=figures)


TESTS: tuple[type[DriftTest], ...] = (MMDTest, LengthTest, LengthTailTest, ConfidenceTest, LabelMixTest)
"""The drift tests, in report order: the Bonferroni family."""


def family_names(tests: Sequence[type[DriftTest]] = TESTS) -> tuple[str, ...]:
    """The names of a family of tests (the exported label values)."""
    return tuple(test.name for test in tests)


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

    def record(self) -> DriftCheck:
        """The check as the database stores it."""
        return DriftCheck(**asdict(self))


class DriftDetector:
    """The family of tests for one model version, each set up once against its reference."""

    def __init__(
        self,
        model_version: str,
        model: SentimentModel,
        reference: DriftReference,
        *,
        p_value: float,
        permutations: int,
        window_size: int,
        tests: Sequence[type[DriftTest]] = TESTS,
        mmd_engine: str = DEFAULT_ENGINE,
        seed: int = 0,
    ) -> None:
        """``mmd_engine`` names the MMD test's engine (``SENTIMENT_DRIFT_BACKEND``); ``seed`` seeds the
        permutations of the engines that take one."""
        names = family_names(tests)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"drift tests need distinct names, got {names}")
        self.model_version = model_version
        self.model = model
        self.reference = reference
        self.p_value = p_value
        self.corrected = p_value / len(tests)  # Bonferroni over the family
        self.window_size = window_size
        self.mmd_engine = mmd_engine
        self.tests = [
            test(reference, level=self.corrected, permutations=permutations, engine=mmd_engine, seed=seed)
            for test in tests
        ]
        self.names = names

    def check(self, rows: Sequence[WindowRow], now: float | None = None) -> DriftResult:
        """Test the latest window (its text, confidence, p_positive), or say it is not full yet."""
        return self.check_window(rows, now)[0]

    def check_window(self, rows: Sequence[WindowRow], now: float | None = None) -> tuple[DriftResult, Window | None]:
        """:meth:`check`, and the full window it tested (None while not full): the drift monitor estimates
        accuracy from its ``p_positive`` and explains drift from its embeddings without computing them again."""
        now = now or time.time()
        confidence = np.array([r.confidence for r in rows], dtype=np.float64)
        if len(rows) < self.window_size:
            insufficient = DriftResult(
                now,
                self.model_version,
                "insufficient_data",
                False,
                len(rows),
                confidence_mean=float(confidence.mean()) if len(rows) else None,
                details={"needed": self.window_size, "reference_size": self.reference.size},
            )
            return insufficient, None
        texts = [r.text for r in rows]
        window = Window(
            embeddings=embed(self.model, self.reference.components, texts),
            lengths=np.array([len(t) for t in texts], dtype=np.float64),
            confidence=confidence,
            p_positive=np.array([r.p_positive for r in rows], dtype=np.float64),
        )
        return self.test(window, now), window

    def test(self, window: Window, now: float | None = None) -> DriftResult:
        """Every test of the family on a full window, and the corrected verdict."""
        outcomes = {test.name: test.run(window) for test in self.tests}
        p_values = {name: outcome.p_value for name, outcome in outcomes.items()}
        drift = min(p_values.values()) < self.corrected
        headline = outcomes.get(HEADLINE_TEST)
        details: dict[str, Any] = {
            "p_values": p_values,
            "corrected_threshold": self.corrected,
            "tests_rejecting": sorted(k for k, v in p_values.items() if v < self.corrected),
        }
        for outcome in outcomes.values():
            details.update(outcome.figures)
        details["reference_size"] = self.reference.size
        return DriftResult(
            checked_at=now or time.time(),
            model_version=self.model_version,
            status="drift" if drift else "no_drift",
            drift=drift,
            window_size=window.size,
            score=headline.statistic if headline else None,
            p_value=headline.p_value if headline else None,
            threshold=headline.threshold if headline else None,
            confidence_mean=float(window.confidence.mean()),
            details=details,
        )
