"""Drift tests on real data: quiet on unseen in-domain text, loud on another domain or label mix."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.ml.drift_reference import DriftReference, embed, load_reference, reference_artifacts
from app.ml.registry import LoadedModel
from app.monitoring.drift import TESTS, DriftDetector, DriftTest, Outcome, Window, family_names
from app.monitoring.monitor import export
from app.storage.predictions import WindowRow

WINDOW = 200


def rows(model: LoadedModel, texts: list[str]) -> list[WindowRow]:
    proba = model.model.predict_proba(texts)[:, 1]
    return [
        WindowRow(t, float(max(p, 1 - p)), float(p), "positive" if p >= 0.5 else "negative", 0.0)
        for t, p in zip(texts, proba, strict=True)
    ]


@pytest.fixture
def detector(current: LoadedModel, reference: DriftReference) -> DriftDetector:
    return DriftDetector(current.version, current.model, reference, p_value=0.05, permutations=100, window_size=WINDOW)


def test_reference_comes_from_held_out_rows(current: LoadedModel, reference: DriftReference) -> None:
    data = current.metadata["data"]
    assert reference.size == data["drift_reference_rows"] <= data["holdout_rows"]
    assert reference.embeddings.shape == (reference.size, 32)
    assert reference.confidence.min() > 0.5 and reference.confidence.max() <= 1


def test_no_verdict_until_the_window_is_full(
    detector: DriftDetector, current: LoadedModel, unseen_in_domain: list[str]
) -> None:
    result = detector.check(rows(current, unseen_in_domain[: WINDOW - 1]))
    assert result.status == "insufficient_data" and not result.drift and result.p_value is None
    assert result.window_size == WINDOW - 1


def test_in_domain_windows_are_not_flagged(
    detector: DriftDetector, current: LoadedModel, unseen_in_domain: list[str]
) -> None:
    rng = random.Random(0)
    verdicts = [detector.check(rows(current, rng.sample(unseen_in_domain, WINDOW))).drift for _ in range(5)]
    assert sum(verdicts) <= 1  # 5 % family-wise false alarms: one in five would already be unlucky


def test_clothing_reviews_are_flagged_by_every_kind_of_test(
    detector: DriftDetector, current: LoadedModel, clothing_texts: list[str]
) -> None:
    result = detector.check(rows(current, clothing_texts[:WINDOW]))
    assert result.drift and result.status == "drift"
    assert result.score is not None and result.threshold is not None and result.score > result.threshold
    assert {"mmd", "length"} <= set(result.details["tests_rejecting"])
    assert set(result.details["p_values"]) == set(family_names())


def test_a_label_prior_shift_is_flagged(
    detector: DriftDetector, current: LoadedModel, unseen_in_domain: list[str]
) -> None:
    scored = rows(current, unseen_in_domain[:3000])
    negative_heavy = [r for r in scored if r.p_positive < 0.5][:WINDOW]
    result = detector.check(negative_heavy)
    assert result.drift and "label_mix" in result.details["tests_rejecting"]


class NeverRejects(DriftTest):
    """A test that finds nothing: enough to see what joining the family changes."""

    name = "never_rejects"

    def run(self, window: Window) -> Outcome:
        return Outcome(p_value=1.0, statistic=0.0, figures={"never_rejects_window": float(window.size)})


def test_the_bonferroni_family_is_the_list_of_tests(
    current: LoadedModel, reference: DriftReference, clothing_texts: list[str]
) -> None:
    """One more test class in the list: a smaller corrected level, one more p-value and exported label."""
    assert family_names() == ("mmd", "length", "length_tail", "confidence", "label_mix")
    default = DriftDetector(
        current.version, current.model, reference, p_value=0.05, permutations=20, window_size=WINDOW
    )
    assert default.corrected == pytest.approx(0.05 / len(TESTS)) and default.names == family_names()
    extended = DriftDetector(
        current.version,
        current.model,
        reference,
        p_value=0.05,
        permutations=20,
        window_size=WINDOW,
        tests=(*TESTS, NeverRejects),
    )
    assert extended.corrected == pytest.approx(0.05 / (len(TESTS) + 1))
    result = extended.check(rows(current, clothing_texts[:WINDOW]))
    assert result.details["corrected_threshold"] == extended.corrected
    assert set(result.details["p_values"]) == {*family_names(), "never_rejects"}
    assert result.details["never_rejects_window"] == WINDOW
    export(result, extended.names)
    assert REGISTRY.get_sample_value("sentiment_drift_test_p_value", {"test": "never_rejects"}) == 1.0
    exported = {
        s.labels["test"] for m in REGISTRY.collect() if m.name == "sentiment_drift_test_p_value" for s in m.samples
    }
    assert set(extended.names) <= exported


def test_tests_of_a_family_need_distinct_names(current: LoadedModel, reference: DriftReference) -> None:
    """Two tests under one name would hide a p-value from the verdict and the metrics."""
    with pytest.raises(ValueError, match="distinct names"):
        DriftDetector(
            current.version,
            current.model,
            reference,
            p_value=0.05,
            permutations=20,
            window_size=WINDOW,
            tests=(NeverRejects, NeverRejects),
        )


def test_a_loaded_reference_embeds_windows_without_copying_its_components(
    current: LoadedModel, reference: DriftReference, tmp_path: Path, unseen_in_domain: list[str]
) -> None:
    """The components load Fortran-ordered, from this release's files and older C-ordered ones alike, so scipy
    multiplies ``components.T`` in place (otherwise it copies n_features x k floats, ~25 MB, every check)."""
    older = dataclasses.replace(reference, components=np.ascontiguousarray(reference.components))
    for name, write in reference_artifacts(older).items():
        write(tmp_path / name)
    reloaded = load_reference(tmp_path)
    for loaded in (reference, reloaded):
        assert loaded.components.T.flags.c_contiguous
    assert np.array_equal(reloaded.components, reference.components)
    window = unseen_in_domain[:50]
    assert np.array_equal(
        embed(current.model, older.components, window), embed(current.model, reference.components, window)
    )
