"""Text preprocessing built only from NLTK's offline parts, persisted inside the model pipeline."""

from __future__ import annotations

import re
import sys
from functools import lru_cache

from nltk.sentiment.util import CLAUSE_PUNCT, NEGATION
from nltk.stem.snowball import SnowballStemmer

_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"(?<!\w)@\w+")
_ELONGATED = re.compile(r"(.)\1{3,}")
_STEMMER = SnowballStemmer("english")
_NEGATION = re.compile(NEGATION, re.VERBOSE)  # NLTK's definitions (nltk.sentiment.util), compiled by re
_CLAUSE_PUNCT = re.compile(CLAUSE_PUNCT)
# A tweet-aware regular expression ten times cheaper than NLTK's TweetTokenizer (20 vs 210 us per
# snippet), which dominated serving cost; it keeps what sentiment needs: emoticons, contractions
# such as "didn't" (mark_negation keys on them) and @handles.
WORD_PATTERN = r"""(?x)
      [<>]?[:;=8][\-o*']?[)\](\[dp/\\}{@|]   # emoticons
    | @\w+                                      # handles (normalized to @user)
    | [a-z0-9]+(?:['\u2019][a-z]+)*             # words, keeping contractions whole
    | [^\sa-z0-9]                              # any other symbol, one at a time: mark_negation
                                                 # ends a clause only at a lone . : ; ! or ?
    """
WORD_FLAGS = re.UNICODE | re.MULTILINE | re.DOTALL  # nltk.tokenize.RegexpTokenizer's defaults
_TOKENS = re.compile(WORD_PATTERN, WORD_FLAGS)
"""``RegexpTokenizer(WORD_PATTERN, flags=WORD_FLAGS).tokenize`` is ``findall`` of this pattern, but NLTK
3.10 runs it through ``nltk.redos.TimedPattern`` (a match timeout), 18 us per text instead of 3; the
tests hold this to NLTK's tokenizer token for token."""


MAX_CACHED_TOKEN_CHARS = 40
"""Longer tokens are stemmed on every call, never cached. Real vocabularies have almost none (3 of 2.1
million tokens in the three corpora), but a client can send thousands of distinct 4,000-character
"words": cached, each would have kept ~8 KB alive, and a 200,000-entry cache grew a worker by 1.5 GB."""

STEM_CACHE_MAX_BYTES = 32 * 2**20
"""Most memory the stem cache can hold, by construction: its size is this divided by the largest entry."""

# The largest entry: a token of MAX_CACHED_TOKEN_CHARS 4-byte characters (an "@handle" can hold any
# word character) and its stem (never longer), plus the cache's own link and dict slot (72 bytes and
# up to 60 right after the dict grows, CPython 3.11).
_STEM_ENTRY_MAX_BYTES = 2 * sys.getsizeof(chr(0x10FFFF) * MAX_CACHED_TOKEN_CHARS) + 160
STEM_CACHE_SIZE = STEM_CACHE_MAX_BYTES // _STEM_ENTRY_MAX_BYTES
"""53,092 entries; the three corpora hold 39,531 distinct tokens."""


def _stem_uncached(token: str) -> str:
    return str(_STEMMER.stem(token))


# Stemming is the costliest step per token; vocabularies are Zipfian, so a cache hits almost always.
_stem_cached = lru_cache(maxsize=STEM_CACHE_SIZE)(_stem_uncached)


def _stem(token: str) -> str:
    """The Snowball stem of ``token``, cached unless the token is longer than MAX_CACHED_TOKEN_CHARS."""
    return _stem_cached(token) if len(token) <= MAX_CACHED_TOKEN_CHARS else _stem_uncached(token)


def normalize(text: str) -> str:
    """Lower-case; URLs and @handles become placeholders; letters repeated 4+ times shrink to 3."""
    text = _USER.sub(" @user ", _URL.sub(" http ", text.lower()))
    return _ELONGATED.sub(r"\1\1\1", text)


def mark_negation(tokens: list[str]) -> list[str]:
    """NLTK's ``mark_negation(tokens, shallow=True)``, with NLTK's own patterns compiled by ``re``.

    NLTK 3.9+ wraps its patterns in ``nltk.redos.TimedPattern`` (a ReDoS guard that runs every match
    with a timeout): two calls per token made negation marking 56 of the 81 us that tokenizing a text
    took. These patterns are fixed and linear, so nothing is guarded against here; the result is the
    same token for token (``tests/ml/test_preprocess.py`` checks it against NLTK on real corpora).
    """
    in_scope = False
    for i, token in enumerate(tokens):
        if _NEGATION.search(token):
            if in_scope:
                tokens[i] += "_NEG"
            else:
                in_scope = True
        elif in_scope:
            if _CLAUSE_PUNCT.search(token):
                in_scope = False
            else:
                tokens[i] += "_NEG"
    return tokens


def tokenize(text: str) -> list[str]:
    """Lower-cased, stemmed tokens with NLTK's ``_NEG`` suffix on tokens in a negated clause.

    Example: ``"not good at all."`` -> ``["not", "good_NEG", "at_NEG", "all_NEG", "."]``.
    """
    # _stem's rule inlined: one Python call per token fewer on the serving path.
    return mark_negation(
        [
            _stem_cached(t) if len(t) <= MAX_CACHED_TOKEN_CHARS else _stem_uncached(t)
            for t in _TOKENS.findall(normalize(text))
        ]
    )


class WordAnalyzer:
    """Callable analyzer for ``TfidfVectorizer(analyzer=...)``: tokens plus word n-grams.

    A class (not a closure) so joblib can persist it by reference to this module.
    """

    def __init__(self, ngram_range: tuple[int, int] = (1, 2)) -> None:
        self.ngram_range = ngram_range

    def __call__(self, text: str) -> list[str]:
        tokens = tokenize(text)
        low, high = self.ngram_range
        grams: list[str] = []
        for n in range(low, high + 1):
            if n == 1:
                grams.extend(tokens)
            else:
                grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        return grams

    def __repr__(self) -> str:
        return f"WordAnalyzer(ngram_range={self.ngram_range!r})"
