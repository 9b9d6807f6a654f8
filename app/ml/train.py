"""Training: fit on a split, evaluate on held-out rows, register a version (CLI: ``python -m app.cli train``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from joblib import Parallel, delayed
from numpy.typing import NDArray
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm import tqdm

from app.ml.data import CORPORA, Corpus
from app.ml.drift_reference import DriftReference, build_reference
from app.ml.model import DEFAULT_KIND, SentimentModel, build_model
from app.ml.model_card import register_version
from app.ml.registry import ModelRegistry, ModelVersion

log = structlog.get_logger(__name__)

PromotePolicy = Literal["if-none", "always", "never"]


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: the registered version, its report, and whether it became current."""

    version: ModelVersion
    report: dict[str, Any]
    promoted: bool


def split_holdout(corpus: Corpus, fraction: float, seed: int) -> tuple[Corpus, Corpus]:
    """Stratified split into (fit, holdout); holdout rows are never seen by any fitted step."""
    index = np.arange(len(corpus))
    fit_idx, hold_idx = train_test_split(index, test_size=fraction, stratify=corpus.labels, random_state=seed)
    return corpus.subset(np.sort(fit_idx), f"{corpus.name}:fit"), corpus.subset(
        np.sort(hold_idx), f"{corpus.name}:holdout"
    )


def cross_validate(
    corpus: Corpus,
    params: Mapping[str, Any],
    folds: int,
    *,
    seed: int = 0,
    progress: bool = True,
    kind: str = DEFAULT_KIND,
) -> dict[str, Any]:
    """Stratified k-fold accuracy of a model of ``kind`` on the whole corpus (2 folds at a time)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    texts = np.asarray(corpus.texts, dtype=object)

    def fold_accuracy(train: NDArray[np.int64], test: NDArray[np.int64]) -> float:
        model = build_model(kind, params).fit(list(texts[train]), corpus.labels[train])
        return float((model.predict(list(texts[test])) == corpus.labels[test]).mean())

    jobs = (delayed(fold_accuracy)(tr, te) for tr, te in splitter.split(texts, corpus.labels))
    scores = []
    with tqdm(total=folds, desc=f"{folds}-fold CV", unit="fold", disable=not progress) as bar:
        for score in Parallel(n_jobs=2, return_as="generator_unordered")(jobs):
            scores.append(score)
            bar.update()
    return {
        "folds": folds,
        "accuracy_mean": float(np.mean(scores)),
        "accuracy_std": float(np.std(scores)),
        "accuracy_per_fold": sorted(scores),
    }


def train_and_register(
    registry: ModelRegistry,
    corpus: Corpus,
    params: Mapping[str, Any] | None = None,
    *,
    kind: str = DEFAULT_KIND,
    seed: int = 0,
    holdout_fraction: float = 0.15,
    drift_reference_size: int = 1000,
    cv_folds: int = 0,
    promote: PromotePolicy = "if-none",
    parent: str | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Fit a model of ``kind`` on ``corpus`` minus a stratified holdout, evaluate it there and register it.

    ``params`` are the kind's hyper-parameters (missing ones take the kind's defaults); ``seed`` draws
    the holdout, the cross-validation folds and the drift reference. The version's card records metrics,
    model kind, parameters, data fingerprints, library versions and parent
    (:func:`app.ml.model_card.register_version`). Up to ``drift_reference_size`` holdout rows become the
    drift reference. ``promote``: ``if-none`` makes it current only when the store has no current version.
    """
    params = params or {}
    started = time.perf_counter()
    fit, holdout = split_holdout(corpus, holdout_fraction, seed)
    cv = cross_validate(corpus, params, cv_folds, seed=seed, progress=progress, kind=kind) if cv_folds > 1 else None
    with tqdm(total=2, desc="train", unit="step", disable=not progress) as steps:
        steps.set_postfix_str(f"fit on {len(fit)} rows")
        model, fit_seconds = fit_model(kind, params, fit)
        steps.update()
        steps.set_postfix_str(f"evaluate on {len(holdout)} rows, register")
        registered = register_version(
            registry,
            model,
            fit=fit,
            holdout=holdout,
            reference=holdout_reference(model, fit, holdout, drift_reference_size, seed),
            data=corpus_description(corpus, holdout_fraction, seed),
            parent=parent if parent is not None else registry.current_version(),
            extra={"training_seconds": round(time.perf_counter() - started, 2), "fit_seconds": round(fit_seconds, 2)},
            report_extra={"cross_validation": cv} if cv else None,
        )
        steps.update()
    return _conclude(registry, registered.version, registered.report, promote)


def _conclude(
    registry: ModelRegistry, version: ModelVersion, report: dict[str, Any], promote: PromotePolicy
) -> TrainingResult:
    """Promote a freshly registered version as ``promote`` says, and log it."""
    promoted = promote == "always" or (promote == "if-none" and registry.current_version() is None)
    if promoted:
        registry.promote(version.version)
    log.info(
        "model_trained",
        model_version=version.version,
        model_kind=version.metadata.get("model", {}).get("kind"),
        accuracy=report["accuracy"],
        ece=report["ece"],
        promoted=promoted,
        seconds=version.metadata["training_seconds"],
    )
    return TrainingResult(registry.get(version.version), report, promoted)


def fit_model(kind: str, params: Mapping[str, Any], fit: Corpus) -> tuple[SentimentModel, float]:
    """A model of ``kind`` fitted on ``fit``, and the seconds the fit took."""
    started = time.perf_counter()
    model = build_model(kind, params).fit(fit.texts, fit.labels)
    return model, time.perf_counter() - started


def holdout_reference(model: SentimentModel, fit: Corpus, holdout: Corpus, size: int, seed: int) -> DriftReference:
    """The drift reference of a freshly trained model: up to ``size`` random holdout rows."""
    rows = np.random.default_rng(seed).permutation(len(holdout))[:size]
    texts = [holdout.texts[i] for i in rows]
    return build_reference(model, fit.texts, texts, model.p_positive(texts), seed=seed)


def corpus_description(corpus: Corpus, holdout_fraction: float, seed: int) -> dict[str, Any]:
    """The card's ``data`` block for a model trained on ``corpus`` split by :func:`split_holdout`.

    ``base_corpus`` is the corpus's name in :data:`CORPORA` (None for a sample or an unregistered
    corpus): what a retrain reloads and splits the same way (``holdout_fraction``, ``holdout_seed``).
    """
    return {
        "corpus": corpus.name,
        "base_corpus": corpus.name if corpus.name in CORPORA else None,
        "fingerprint": corpus.fingerprint,
        "rows": len(corpus),
        "holdout_fraction": holdout_fraction,
        "holdout_seed": seed,
    }
