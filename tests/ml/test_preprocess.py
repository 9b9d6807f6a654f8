"""Preprocessing: tokens, negation scope, normalisation, and an analyzer that survives persistence."""

from __future__ import annotations

from collections.abc import Callable

import joblib
import pytest
from nltk.sentiment.util import mark_negation as nltk_mark_negation
from nltk.tokenize import RegexpTokenizer

from app.ml import preprocess
from app.ml.data import Corpus, load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.preprocess import WordAnalyzer, normalize, tokenize


def test_negation_marks_tokens_until_clause_punctuation() -> None:
    assert tokenize("I didn't like it. Great ending") == ["i", "didn't", "like_NEG", "it_NEG", ".", "great", "end"]


def test_negation_scope_also_ends_at_each_exclamation_mark() -> None:
    assert tokenize("not good!! fun") == ["not", "good_NEG", "!", "!", "fun"]


def test_urls_and_handles_become_placeholders_and_elongations_shrink() -> None:
    assert normalize("SO Goooooood @critic_99 https://t.co/xyz") == "so goood  @user   http "
    assert tokenize("@bob sooooo good :)") == ["@user", "sooo", "good", ":)"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_gives_no_tokens(text: str) -> None:
    assert tokenize(text) == []


def test_word_analyzer_emits_unigrams_then_bigrams() -> None:
    assert WordAnalyzer((1, 2))("bad film") == ["bad", "film", "bad film"]


def test_word_analyzer_round_trips_through_joblib(tmp_path) -> None:
    path = tmp_path / "analyzer.joblib"
    joblib.dump(WordAnalyzer((1, 3)), path)
    restored = joblib.load(path)
    assert restored("not a good movie") == WordAnalyzer((1, 3))("not a good movie")


@pytest.mark.parametrize("loader", [load_rotten_tomatoes, load_tweets, load_clothing])
def test_tokens_and_negation_are_nltks_token_for_token_on_real_text(loader: Callable[[], Corpus]) -> None:
    # The run-time path compiles NLTK's patterns with re (NLTK 3.10 times out every match); NLTK is the
    # reference: its RegexpTokenizer and mark_negation must give the same tokens.
    nltk_tokenizer = RegexpTokenizer(preprocess.WORD_PATTERN, flags=preprocess.WORD_FLAGS)
    texts = [*loader().texts[:3000], "no no never good .", "not ; nothing bad", "isn't it ? won't :-) @x"]
    for text in texts:
        nltk_tokens = [preprocess._stem(t) for t in nltk_tokenizer.tokenize(normalize(text))]
        assert tokenize(text) == nltk_mark_negation(nltk_tokens, shallow=True), text
