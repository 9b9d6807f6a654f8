"""Drift explanations on real data: in-domain windows look like the reference, other domains do not, and why."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from app.ml.data import load_tweets
from app.ml.drift_reference import DriftReference, embed
from app.ml.registry import REFERENCE_ARTIFACT, LoadedModel
from app.monitoring.explain import (
    FORMAT_VERSION,
    DriftExplanation,
    DriftExplanationFormatError,
    TermCounts,
    compare_terms,
    count_terms,
    explain,
)

WINDOW = 500  # the default SENTIMENT_DRIFT_WINDOW_SIZE
CLOTHING_WORDS = {"dress", "size", "fit", "fabric", "wear", "color", "top", "this dress", "ordered", "soft"}
FILM_WORDS = {"film", "movie", "the film", "story", "characters", "plot", "director", "comedy"}


@pytest.fixture
def reference_terms(current: LoadedModel) -> TermCounts:
    """The version's held-out texts (its drift reference is a sample of them), counted as a monitor would."""
    return count_terms(current.read_json(REFERENCE_ARTIFACT)["texts"])


@pytest.fixture(scope="session")
def tweet_texts() -> list[str]:
    texts = load_tweets().texts
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:WINDOW]]


def without_timing(explanation: DriftExplanation) -> DriftExplanation:
    return replace(explanation, seconds=0.0)


def test_an_in_domain_window_is_indistinguishable_from_the_reference(
    current: LoadedModel, reference: DriftReference, reference_terms: TermCounts, unseen_in_domain: list[str]
) -> None:
    """Unseen Rotten Tomatoes rows: AUC near 0.5 and (almost) no term passes the corrected threshold."""
    window = [unseen_in_domain[i] for i in np.random.default_rng(1).choice(len(unseen_in_domain), WINDOW, False)]
    found = explain(current.model, reference, window, reference_terms=reference_terms)
    assert abs(found.domain_auc - 0.5) < 0.08, found.domain_auc_folds
    assert found.over_represented is not None and found.under_represented is not None
    assert len(found.over_represented) + len(found.under_represented) <= 2
    assert found.terms_tested > 100 and found.term_z_threshold is not None and found.term_z_threshold > 3
    assert (found.window_rows, found.reference_rows) == (WINDOW, reference.size)


def test_clothing_reviews_are_separable_and_their_words_are_named(
    current: LoadedModel, reference: DriftReference, reference_terms: TermCounts, clothing_texts: list[str]
) -> None:
    """Clothing reviews against movie reviews: high AUC, garment words over, film words under, reviews shown."""
    window = clothing_texts[:WINDOW]
    found = explain(current.model, reference, window, reference_terms=reference_terms)
    assert found.domain_auc > 0.9
    assert found.over_represented is not None and found.under_represented is not None
    over = [t.term for t in found.over_represented]
    under = [t.term for t in found.under_represented]
    assert len(CLOTHING_WORDS & set(over)) >= 4, over
    assert len(FILM_WORDS & set(under)) >= 3, under
    threshold = found.term_z_threshold
    assert threshold is not None
    assert all(
        t.window_rate > t.reference_rate and t.log_ratio > 0 and t.z >= threshold for t in found.over_represented
    )
    assert all(
        t.window_rate < t.reference_rate and t.log_ratio < 0 and t.z <= -threshold for t in found.under_represented
    )
    ratios = [t.log_ratio for t in found.over_represented]
    assert ratios == sorted(ratios, reverse=True)  # largest difference first
    texts = [e.text for e in found.examples]
    assert len(texts) == len(set(texts)) == 5 and set(texts) <= set(window)  # verbatim, distinct
    scores = [e.score for e in found.examples]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0.9


def test_tweets_are_separable_and_their_markers_are_named(
    current: LoadedModel, reference: DriftReference, reference_terms: TermCounts, tweet_texts: list[str]
) -> None:
    """Tweets against movie reviews: links, airlines and hashtags over-represented; film words under."""
    found = explain(current.model, reference, tweet_texts, reference_terms=reference_terms)
    assert found.domain_auc > 0.8
    assert found.over_represented is not None and found.under_represented is not None
    over = {t.term for t in found.over_represented}
    assert len({"http", "http co", "flight", "united", "usairways", "rt", "deflategate"} & over) >= 3, over
    assert FILM_WORDS & {t.term for t in found.under_represented}


def test_an_explanation_survives_its_json_round_trip(
    current: LoadedModel, reference: DriftReference, reference_terms: TermCounts, clothing_texts: list[str]
) -> None:
    """to_dict -> JSON text -> from_dict gives back an equal explanation, with and without term lists."""
    for terms in (reference_terms, None):
        found = explain(current.model, reference, clothing_texts[:200], reference_terms=terms)
        stored = json.dumps(found.to_dict(), sort_keys=True)
        assert DriftExplanation.from_dict(json.loads(stored)) == found
        assert json.loads(stored)["format_version"] == FORMAT_VERSION
    assert found.over_represented is None and found.under_represented is None and found.terms_tested == 0


def test_a_newer_stored_format_is_refused(
    current: LoadedModel, reference: DriftReference, clothing_texts: list[str]
) -> None:
    """An explanation written by a later release raises the domain error, never a KeyError or a wrong reading."""
    stored = explain(current.model, reference, clothing_texts[:100]).to_dict()
    with pytest.raises(DriftExplanationFormatError):
        DriftExplanation.from_dict({**stored, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(DriftExplanationFormatError):
        TermCounts.from_dict({**count_terms(clothing_texts[:10]).to_dict(), "ngram_range": [1, 3]})


def test_explanations_are_reproducible_and_bounded(
    current: LoadedModel, reference: DriftReference, reference_terms: TermCounts, clothing_texts: list[str]
) -> None:
    """Same inputs, same explanation; a window past the cap is subsampled; given embeddings change nothing."""
    window = clothing_texts[:600]
    capped = explain(current.model, reference, window, reference_terms=reference_terms, max_window_rows=300)
    again = explain(current.model, reference, window, reference_terms=reference_terms, max_window_rows=300)
    assert without_timing(capped) == without_timing(again)
    assert capped.window_rows == 300 and set(e.text for e in capped.examples) <= set(window)
    embedded = embed(current.model, reference.components, window)
    reused = explain(
        current.model,
        reference,
        window,
        reference_terms=reference_terms,
        window_embeddings=embedded,
        max_window_rows=300,
    )
    assert without_timing(reused) == without_timing(capped)


def test_a_window_too_small_to_cross_validate_is_refused(current: LoadedModel, reference: DriftReference) -> None:
    with pytest.raises(ValueError, match="2 rows of each side"):
        explain(current.model, reference, ["One lone review."])


def test_terms_are_counted_once_per_text_and_pruned(reference_terms: TermCounts) -> None:
    """Document frequency, not occurrences; ``min_texts`` drops rarer terms; the counts round-trip as JSON."""
    counted = count_terms(["The film, the film!", "A film.", "Another one"], min_texts=2)
    assert counted == TermCounts(3, {"film": 2})
    assert count_terms(["The film, the film!"]).counts == {"the": 1, "film": 1, "the film": 1, "film the": 1}
    assert TermCounts.from_dict(json.loads(json.dumps(reference_terms.to_dict()))) == reference_terms


def test_identical_counts_list_no_terms(reference_terms: TermCounts) -> None:
    """A window whose counts equal the reference's differs in nothing, so nothing is listed."""
    over, under, tested, threshold = compare_terms(reference_terms, reference_terms)
    assert (over, under) == ((), ()) and tested > 0 and threshold is not None
