"""Preprocessing: tokens, negation scope, normalisation, and an analyzer that survives persistence."""

from __future__ import annotations

import random
import string
import tracemalloc
from collections.abc import Callable, Iterator

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


def _distinct_tokens(n: int, length: int, alphabet: str, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choices(alphabet, k=length))


def test_long_tokens_are_stemmed_as_before_but_never_cached() -> None:
    preprocess._stem_cached.cache_clear()
    long_tokens = ["unbelievably" * 4, "disappointingly" * 10, *_distinct_tokens(20, 4000, string.ascii_lowercase)]
    for token in long_tokens:
        (normalized,) = preprocess._TOKENS.findall(normalize(token))  # a letter repeated 4+ times shrinks
        assert len(normalized) > preprocess.MAX_CACHED_TOKEN_CHARS
        assert tokenize(token) == [str(preprocess._STEMMER.stem(normalized))]
    assert tokenize("x" * 3 + "running") == ["xxxrun"]  # a short one is cached
    assert preprocess._stem_cached.cache_info().currsize == 1


def test_the_stem_cache_cannot_outgrow_its_byte_budget() -> None:
    # The largest entries: 40-character "@handles" of 4-byte word characters ("x@..." stays a handle). 6,000
    # entries just passed a growth of the cache's dict, where a slot costs the most per entry.
    preprocess._stem_cached.cache_clear()
    wide = "".join(chr(c) for c in range(0x20000, 0x20100))
    entries = 6000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for token in _distinct_tokens(entries, preprocess.MAX_CACHED_TOKEN_CHARS - 1, wide):
            assert tokenize("x@" + token)[1] == "@" + token
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / entries
    finally:
        tracemalloc.stop()
        preprocess._stem_cached.cache_clear()
    assert per_entry <= preprocess._STEM_ENTRY_MAX_BYTES, per_entry
    assert preprocess.STEM_CACHE_SIZE * preprocess._STEM_ENTRY_MAX_BYTES <= preprocess.STEM_CACHE_MAX_BYTES
    assert preprocess.STEM_CACHE_SIZE >= 50_000  # the three corpora hold 39,531 distinct tokens
