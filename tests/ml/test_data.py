"""Corpus loading: labels, cleaning and fingerprints of the corpora in data/."""

from __future__ import annotations

import numpy as np

from app.ml.data import Corpus, fingerprint_rows, load_clothing, load_tweets


def test_rotten_tomatoes_keeps_reviews_only_with_their_labels(rotten_tomatoes: Corpus) -> None:
    # 7,403 fresh and 5,405 rotten snippets; plot synopses and rows without text are gone.
    assert int((rotten_tomatoes.labels == 1).sum()) == 7_403
    assert int((rotten_tomatoes.labels == 0).sum()) == 5_405
    assert all(text.strip() for text in rotten_tomatoes.texts)


def test_tweets_drop_neutral_and_clothing_drops_rating_three() -> None:
    tweets, clothing = load_tweets(), load_clothing()
    assert len(tweets) == 23_140 and set(np.unique(tweets.labels)) == {0, 1}
    assert len(clothing) == 19_818 and 0.87 < clothing.labels.mean() < 0.89


def test_fingerprint_covers_rows_and_labels(rotten_tomatoes: Corpus) -> None:
    head = rotten_tomatoes.subset(range(100))
    flipped = Corpus(head.name, head.texts, 1 - head.labels, "")
    assert head.fingerprint == rotten_tomatoes.subset(range(100)).fingerprint
    assert head.fingerprint != rotten_tomatoes.subset(range(1, 101)).fingerprint
    assert fingerprint_rows(flipped.texts, flipped.labels) != head.fingerprint
