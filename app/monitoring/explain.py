"""Drift explanations: what separates a flagged live window from its model version's drift reference.

Three views, each bounded in cost so that the drift monitor (nice 19, one compute thread) can afford one per
flagged check:

- a domain classifier: standardised logistic regression telling window rows from reference rows in the space
  the drift tests embed (the model's own features, :meth:`SentimentModel.features`, projected onto the
  reference's components: :func:`app.ml.drift_reference.embed`). That is the one view of the reference rows a
  stored drift reference holds, whatever its source (held-out rows, or a retrain's recent traffic). Its
  stratified k-fold cross-validated ROC AUC is the effect size: 0.5, indistinguishable; 1.0, fully separable;
- n-grams (lower-cased word unigrams and bigrams) over- and under-represented in the window: the share of
  window texts containing each against the share of reference texts, a smoothed log rate ratio (the order of
  the lists) and a signed likelihood-ratio z. Only terms past the Bonferroni threshold over every term tested
  are listed, so an in-domain window lists few or none. The reference side is a :class:`TermCounts`, counted
  once per model version (a drift reference stores no texts; see :func:`count_terms`);
- the window texts the domain classifier finds least like the reference: the highest out-of-fold
  P(window) (classes balanced, so 0.5 is undecided), verbatim.

A :class:`DriftExplanation` is stored with its check as JSON (:meth:`DriftExplanation.to_dict`, versioned by
:data:`FORMAT_VERSION`); :meth:`DriftExplanation.from_dict` reads every version up to this one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from app.errors import SentimentServiceError
from app.ml.drift_reference import DriftReference, embed
from app.ml.model import SentimentModel

FORMAT_VERSION = 1
"""Version of the stored explanation this release writes; it reads every version up to this one."""
TERM_COUNTS_FORMAT_VERSION = 1
"""Version of :meth:`TermCounts.to_dict`'s format (the n-gram analyzer below is part of it)."""
NGRAM_RANGE = (1, 2)
WORD_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more characters
SMOOTHING = 0.5  # added to every count (Haldane-Anscombe): terms absent from one side get finite ratios

# Cost bounds (bench/drift_explain.py measures them at the default window).
MAX_WINDOW_ROWS = 2000
"""Most window texts explained; a larger window is subsampled (with ``seed``)."""
MAX_REFERENCE_ROWS = 2000
"""Most reference rows the domain classifier sees."""
MAX_TERM_TEXTS = 5000
"""Most texts :func:`count_terms` counts."""
FOLDS = 5
DOMAIN_C = 1.0  # inverse L2 strength; 32 standardised features need little regularisation either way
TOP_TERMS = 10
EXAMPLES = 5
MIN_TERM_TEXTS = 5
"""A term is tested only if at least this many texts, window and reference together, contain it."""
TERM_ALPHA = 0.05
"""Family-wise level of the listed terms (Bonferroni over every term tested, two-sided)."""


class DriftExplanationFormatError(SentimentServiceError):
    """A stored drift explanation (or term count) is of a format this release cannot read."""

    code = "drift_explanation_format"


@dataclass(frozen=True)
class TermCounts:
    """How many of ``texts`` texts contain each n-gram (document frequencies), as :func:`count_terms` counts."""

    texts: int
    counts: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (terms sorted), with its format version and the analyzer's n-gram range."""
        return {
            "format_version": TERM_COUNTS_FORMAT_VERSION,
            "ngram_range": list(NGRAM_RANGE),
            "texts": self.texts,
            "counts": dict(sorted(self.counts.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TermCounts:
        """Counts :meth:`to_dict` wrote; :class:`DriftExplanationFormatError` for another format or analyzer."""
        _check_version(data, TERM_COUNTS_FORMAT_VERSION, "term counts")
        if list(data.get("ngram_range", [])) != list(NGRAM_RANGE):
            raise DriftExplanationFormatError(
                f"term counts of n-grams {data.get('ngram_range')!r}, this release compares {list(NGRAM_RANGE)}"
            )
        return cls(int(data["texts"]), {str(k): int(v) for k, v in data["counts"].items()})


@dataclass(frozen=True)
class Term:
    """An n-gram whose share of texts differs between the window and the reference."""

    term: str
    window_rate: float  # share of window texts containing it
    reference_rate: float  # share of reference texts containing it
    log_ratio: float  # natural log of the smoothed window rate over the smoothed reference rate
    z: float  # signed root of the log-likelihood ratio G² (> 0: over-represented in the window; ~N(0, 1) if equal)


@dataclass(frozen=True)
class Example:
    """A window text, verbatim, and the domain classifier's out-of-fold P(window) for it."""

    text: str
    score: float


@dataclass(frozen=True)
class DriftExplanation:
    """What separates one window from the reference (module docstring); stored with its drift check."""

    domain_auc: float  # mean over the folds of the domain classifier's ROC AUC (0.5: indistinguishable)
    domain_auc_folds: tuple[float, ...]
    window_rows: int  # window texts explained (the window, subsampled to MAX_WINDOW_ROWS)
    reference_rows: int  # reference rows the domain classifier saw
    features: int  # dimensions of the domain classifier's input (the reference's components)
    examples: tuple[Example, ...]  # least like the reference first
    over_represented: tuple[Term, ...] | None  # largest log_ratio first; None: no reference term counts given
    under_represented: tuple[Term, ...] | None  # most negative log_ratio first
    terms_tested: int
    term_z_threshold: float | None  # |z| a term needs to be listed (Bonferroni over terms_tested)
    reference_term_texts: int  # reference texts the term rates come from (0: none)
    seconds: float  # wall time of the explanation
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists), read back by :meth:`from_dict`."""
        terms = (self.over_represented, self.under_represented)
        over, under = ([_term_dict(t) for t in found] if found is not None else None for found in terms)
        return {
            "format_version": self.format_version,
            "domain_auc": self.domain_auc,
            "domain_auc_folds": list(self.domain_auc_folds),
            "window_rows": self.window_rows,
            "reference_rows": self.reference_rows,
            "features": self.features,
            "examples": [{"text": e.text, "score": e.score} for e in self.examples],
            "over_represented": over,
            "under_represented": under,
            "terms_tested": self.terms_tested,
            "term_z_threshold": self.term_z_threshold,
            "reference_term_texts": self.reference_term_texts,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftExplanation:
        """An explanation :meth:`to_dict` wrote (by this release or an earlier one); unknown keys are ignored,
        a newer ``format_version`` raises :class:`DriftExplanationFormatError`."""
        version = _check_version(data, FORMAT_VERSION, "drift explanation")

        def terms(key: str) -> tuple[Term, ...] | None:
            found = data.get(key)
            return None if found is None else tuple(_term(t) for t in found)

        threshold = data.get("term_z_threshold")
        return cls(
            domain_auc=float(data["domain_auc"]),
            domain_auc_folds=tuple(float(a) for a in data["domain_auc_folds"]),
            window_rows=int(data["window_rows"]),
            reference_rows=int(data["reference_rows"]),
            features=int(data["features"]),
            examples=tuple(Example(str(e["text"]), float(e["score"])) for e in data["examples"]),
            over_represented=terms("over_represented"),
            under_represented=terms("under_represented"),
            terms_tested=int(data["terms_tested"]),
            term_z_threshold=None if threshold is None else float(threshold),
            reference_term_texts=int(data["reference_term_texts"]),
            seconds=float(data["seconds"]),
            format_version=version,
        )


def _term_dict(term: Term) -> dict[str, Any]:
    return {
        "term": term.term,
        "window_rate": term.window_rate,
        "reference_rate": term.reference_rate,
        "log_ratio": term.log_ratio,
        "z": term.z,
    }


def _term(data: Mapping[str, Any]) -> Term:
    return Term(
        str(data["term"]),
        float(data["window_rate"]),
        float(data["reference_rate"]),
        float(data["log_ratio"]),
        float(data["z"]),
    )


def _check_version(data: Mapping[str, Any], supported: int, what: str) -> int:
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= supported:
        raise DriftExplanationFormatError(
            f"{what} format_version {version!r} is not one this release reads (1 to {supported})",
            details={"format_version": version, "supported": supported},
        )
    return version


# -- n-grams ----------------------------------------------------------------------------------------------
def count_terms(
    texts: Sequence[str], *, min_texts: int = 1, max_texts: int = MAX_TERM_TEXTS, seed: int = 0
) -> TermCounts:
    """How many texts contain each word unigram and bigram (lower-cased; words of two or more characters).

    Up to ``max_texts`` texts are counted (a larger list is sampled with ``seed``); terms in fewer than
    ``min_texts`` of them are dropped (a stored count with ``min_texts=2`` keeps no term of a single text).
    A version's reference side is counted once, from texts of the same source as its drift reference: a
    version's ``reference.json`` texts (its holdout) when the drift reference was drawn from the holdout
    (always after training; after a retrain when its card's ``data.drift_reference_source`` is ``holdout``).
    A retrain's ``recent_traffic`` reference keeps no texts, so no counts share its source.
    """
    chosen = _sample(len(texts), max_texts, seed)
    analyze = CountVectorizer(ngram_range=NGRAM_RANGE, token_pattern=WORD_PATTERN, lowercase=True).build_analyzer()
    counts: Counter[str] = Counter()
    for i in chosen:
        counts.update(set(analyze(texts[i])))
    return TermCounts(len(chosen), {term: n for term, n in counts.items() if n >= min_texts})


def compare_terms(
    window: TermCounts,
    reference: TermCounts,
    *,
    top: int = TOP_TERMS,
    min_texts: int = MIN_TERM_TEXTS,
    alpha: float = TERM_ALPHA,
) -> tuple[tuple[Term, ...], tuple[Term, ...], int, float | None]:
    """The ``top`` terms over- and under-represented in ``window``, how many terms were tested, and the |z| a
    term needs to be listed (None: none tested).

    Listed are the terms whose |z| (:func:`signed_likelihood_ratio`) passes the Bonferroni threshold at
    ``alpha`` over every term tested, largest smoothed log rate ratio first.

    A term is tested when ``min_texts`` texts of both sides together contain it; a term missing from a side's
    counts counts 0 there.
    """
    n_w, n_r = window.texts, reference.texts
    union = window.counts.keys() | reference.counts.keys()
    candidates = sorted(t for t in union if window.counts.get(t, 0) + reference.counts.get(t, 0) >= min_texts)
    if not candidates or not n_w or not n_r:
        return (), (), 0, None
    a = np.array([window.counts.get(t, 0) for t in candidates], dtype=np.float64)
    c = np.array([reference.counts.get(t, 0) for t in candidates], dtype=np.float64)
    z = signed_likelihood_ratio(a, n_w, c, n_r)
    s = SMOOTHING
    log_ratio = np.log((a + s) / (n_w + 2 * s)) - np.log((c + s) / (n_r + 2 * s))
    threshold = float(norm.isf(alpha / (2 * len(candidates))))

    def listed(passes: NDArray[np.bool_], magnitude: NDArray[np.float64]) -> tuple[Term, ...]:
        chosen = [i for i in np.lexsort((np.arange(len(z)), -magnitude)) if passes[i]][:top]
        return tuple(
            Term(candidates[i], float(a[i] / n_w), float(c[i] / n_r), float(log_ratio[i]), float(z[i])) for i in chosen
        )

    # Significance picks the terms, the size of the difference orders them: ordered by z, the commonest words
    # ("the", "and") would lead every list, as their small differences are the most certain.
    return listed(z >= threshold, log_ratio), listed(z <= -threshold, -log_ratio), len(candidates), threshold


def signed_likelihood_ratio(a: NDArray[np.float64], n_a: int, b: NDArray[np.float64], n_b: int) -> NDArray[np.float64]:
    """For ``a`` of ``n_a`` texts against ``b`` of ``n_b``: the signed square root of the log-likelihood ratio
    statistic G² of the 2x2 table (Dunning 1993), positive when the first rate is higher. About standard
    normal when the rates are equal; unlike the Wald z of a log odds ratio, it stays large for a term one
    side lacks."""
    observed = np.stack([a, n_a - a, b, n_b - b])
    total = n_a + n_b
    present = (a + b) / total
    expected = np.stack([n_a * present, n_a * (1 - present), n_b * present, n_b * (1 - present)])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(observed > 0, observed * np.log(observed / expected), 0.0)
    g2 = np.maximum(2 * terms.sum(axis=0), 0.0)
    return np.asarray(np.sign(a / n_a - b / n_b) * np.sqrt(g2), dtype=np.float64)


# -- the domain classifier ---------------------------------------------------------------------------------
def domain_scores(
    reference: NDArray[np.floating[Any]], window: NDArray[np.floating[Any]], *, folds: int = FOLDS, seed: int = 0
) -> tuple[tuple[float, ...], NDArray[np.float64]]:
    """Stratified ``folds``-fold ROC AUC of a classifier telling ``window`` rows from ``reference`` rows, and
    each window row's out-of-fold P(window) (classes weighted equally, so 0.5 is undecided)."""
    x = np.vstack([reference, window]).astype(np.float64)
    y = np.r_[np.zeros(len(reference), dtype=np.int64), np.ones(len(window), dtype=np.int64)]
    splits = min(folds, len(reference), len(window))
    if splits < 2:
        raise ValueError(f"a domain classifier needs 2 rows of each side, got {len(reference)} and {len(window)}")
    out_of_fold = np.empty(len(y), dtype=np.float64)
    aucs = []
    for train, test in StratifiedKFold(splits, shuffle=True, random_state=seed).split(x, y):
        classifier = make_pipeline(
            StandardScaler(), LogisticRegression(C=DOMAIN_C, class_weight="balanced", max_iter=1000)
        )
        classifier.fit(x[train], y[train])
        out_of_fold[test] = classifier.predict_proba(x[test])[:, 1]
        aucs.append(float(roc_auc_score(y[test], out_of_fold[test])))
    return tuple(aucs), out_of_fold[len(reference) :]


# -- the explanation ---------------------------------------------------------------------------------------
def explain(
    model: SentimentModel,
    reference: DriftReference,
    window_texts: Sequence[str],
    *,
    reference_terms: TermCounts | None = None,
    window_embeddings: NDArray[np.floating[Any]] | None = None,
    top_terms: int = TOP_TERMS,
    examples: int = EXAMPLES,
    folds: int = FOLDS,
    max_window_rows: int = MAX_WINDOW_ROWS,
    max_reference_rows: int = MAX_REFERENCE_ROWS,
    seed: int = 0,
) -> DriftExplanation:
    """What separates ``window_texts`` from ``reference`` (the drift reference of ``model``'s version).

    ``reference_terms`` (:func:`count_terms` of the reference's texts, counted once per version) enables the
    n-gram lists; without it they are None. ``window_embeddings`` (``embed(model, reference.components,
    window_texts)``, if the caller has it) saves embedding the window again. Windows above ``max_window_rows``
    and references above ``max_reference_rows`` are subsampled with ``seed``; the result depends on nothing
    else. Runs on one BLAS thread. Raises :class:`ValueError` for a window of fewer than 2 texts.
    """
    started = time.perf_counter()
    with threadpool_limits(1):
        rows = _sample(len(window_texts), max_window_rows, seed)
        texts = [window_texts[i] for i in rows]
        embedded = _window_embeddings(model, reference, window_texts, window_embeddings, rows)
        reference_rows = reference.embeddings[_sample(len(reference.embeddings), max_reference_rows, seed)]
        aucs, scores = domain_scores(reference_rows, embedded, folds=folds, seed=seed)
        over: tuple[Term, ...] | None = None
        under: tuple[Term, ...] | None = None
        tested, threshold = 0, None
        if reference_terms is not None:
            window_terms = count_terms(texts, max_texts=len(texts))
            over, under, tested, threshold = compare_terms(window_terms, reference_terms, top=top_terms)
    return DriftExplanation(
        domain_auc=float(np.mean(aucs)),
        domain_auc_folds=aucs,
        window_rows=len(texts),
        reference_rows=len(reference_rows),
        features=int(reference.components.shape[0]),
        examples=_least_like_reference(texts, scores, examples),
        over_represented=over,
        under_represented=under,
        terms_tested=tested,
        term_z_threshold=threshold,
        reference_term_texts=reference_terms.texts if reference_terms is not None else 0,
        seconds=round(time.perf_counter() - started, 4),
    )


def _window_embeddings(
    model: SentimentModel,
    reference: DriftReference,
    window_texts: Sequence[str],
    given: NDArray[np.floating[Any]] | None,
    rows: NDArray[np.int64],
) -> NDArray[np.floating[Any]]:
    """The embeddings of the sampled window ``rows``: taken from ``given`` (one per window text), else computed."""
    if given is None:
        return embed(model, reference.components, [window_texts[i] for i in rows])
    if len(given) != len(window_texts):
        raise ValueError(f"{len(given)} window embeddings for {len(window_texts)} texts")
    return np.asarray(given)[rows]


def _least_like_reference(texts: list[str], scores: NDArray[np.float64], k: int) -> tuple[Example, ...]:
    found: list[Example] = []
    seen: set[str] = set()
    for i in np.lexsort((np.arange(len(scores)), -scores)):  # highest score first, ties in window order
        if texts[i] not in seen:
            seen.add(texts[i])
            found.append(Example(texts[i], float(scores[i])))
        if len(found) == k:
            break
    return tuple(found)


def _sample(n: int, limit: int, seed: int) -> NDArray[np.int64]:
    """All of ``range(n)``, or ``limit`` of them drawn with ``seed``, in order."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)).astype(np.int64)
