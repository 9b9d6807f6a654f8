"""Training: fit on a split, evaluate on held-out rows, register a version (CLI: ``python -m app.cli train``)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
import structlog
from joblib import Parallel, delayed
from numpy.typing import NDArray
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm import tqdm

from app.ml.data import Corpus
from app.ml.drift_reference import DRIFT_ARTIFACT, DriftReference, build_reference
from app.ml.evaluate import classification_report, plot_confusion_matrix, plot_reliability
from app.ml.pipeline import ModelParams, build_pipeline
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, ModelRegistry, ModelVersion

log = structlog.get_logger(__name__)

PromotePolicy = Literal["if-none", "always", "never"]
LIBRARIES = ("scikit-learn", "nltk", "numpy", "scipy", "joblib")


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: the registered version, its report, and whether it became current."""

    version: ModelVersion
    report: dict[str, Any]
    promoted: bool


def library_versions() -> dict[str, str]:
    """Versions of the libraries a persisted pipeline depends on (unpickling needs the same ones)."""
    return {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}


def split_holdout(corpus: Corpus, fraction: float, seed: int) -> tuple[Corpus, Corpus]:
    """Stratified split into (fit, holdout); holdout rows are never seen by any fitted step."""
    index = np.arange(len(corpus))
    fit_idx, hold_idx = train_test_split(index, test_size=fraction, stratify=corpus.labels, random_state=seed)
    return corpus.subset(np.sort(fit_idx), f"{corpus.name}:fit"), corpus.subset(
        np.sort(hold_idx), f"{corpus.name}:holdout"
    )


def cross_validate(corpus: Corpus, params: ModelParams, folds: int, progress: bool = True) -> dict[str, Any]:
    """Stratified k-fold accuracy of :func:`build_pipeline` on the whole corpus (2 folds at a time)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=params.random_state)
    texts = np.asarray(corpus.texts, dtype=object)

    def fold_accuracy(train: NDArray[np.int64], test: NDArray[np.int64]) -> float:
        model = clone(build_pipeline(params)).fit(list(texts[train]), corpus.labels[train])
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


def _write_json(payload: dict[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    return write


def version_artifacts(
    pipeline: Any, report: dict[str, Any], holdout: Corpus, reference: DriftReference
) -> dict[str, Callable[[Path], None]]:
    """The files of a model version: pipeline, held-out rows, drift reference and the report."""
    return {
        MODEL_ARTIFACT: lambda path: joblib.dump(pipeline, path, compress=3),
        REFERENCE_ARTIFACT: _write_json({"texts": holdout.texts, "labels": holdout.labels.tolist()}),
        DRIFT_ARTIFACT: lambda path: joblib.dump(reference, path, compress=3),
        "report/metrics.json": _write_json(report),
        "report/confusion_matrix.png": lambda path: plot_confusion_matrix(report, path, holdout.name),
        "report/reliability.png": lambda path: plot_reliability(report, path, holdout.name),
    }


def train_and_register(
    registry: ModelRegistry,
    corpus: Corpus,
    params: ModelParams | None = None,
    *,
    holdout_fraction: float = 0.15,
    drift_reference_size: int = 1000,
    cv_folds: int = 0,
    promote: PromotePolicy = "if-none",
    parent: str | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Fit a pipeline on ``corpus`` minus a stratified holdout, evaluate it there and register it.

    The version's metadata records metrics, parameters, data fingerprints, library versions and parent.
    Up to ``drift_reference_size`` holdout rows become the drift reference (``drift.joblib``).
    ``promote`` decides whether it becomes current: ``if-none`` only when the store has no current version.
    """
    params = params or ModelParams()
    started = time.perf_counter()
    fit, holdout = split_holdout(corpus, holdout_fraction, params.random_state)
    cv = cross_validate(corpus, params, cv_folds, progress) if cv_folds > 1 else None

    steps = tqdm(total=3, desc="train", unit="step", disable=not progress)
    steps.set_postfix_str(f"fit on {len(fit)} rows")
    fit_started = time.perf_counter()
    pipeline = build_pipeline(params).fit(fit.texts, fit.labels)
    fit_seconds = time.perf_counter() - fit_started
    steps.update()
    steps.set_postfix_str(f"evaluate on {len(holdout)} rows")
    proba = pipeline.predict_proba(holdout.texts)[:, 1]
    report = classification_report(holdout.labels, proba)
    reference_rows = np.random.default_rng(params.random_state).permutation(len(holdout))[:drift_reference_size]
    reference = build_reference(
        pipeline,
        fit.texts,
        [holdout.texts[i] for i in reference_rows],
        proba[reference_rows],
        seed=params.random_state,
    )
    if cv:
        report["cross_validation"] = cv
    steps.update()
    steps.set_postfix_str("register")

    artifacts = version_artifacts(pipeline, report, holdout, reference)
    metadata = {
        "metrics": {k: v for k, v in report.items() if k != "reliability"},
        "params": params.to_dict(),
        "data": {
            "corpus": corpus.name,
            "fingerprint": corpus.fingerprint,
            "rows": len(corpus),
            "fit_rows": len(fit),
            "fit_fingerprint": fit.fingerprint,
            "holdout_rows": len(holdout),
            "holdout_fingerprint": holdout.fingerprint,
            "holdout_fraction": holdout_fraction,
            "drift_reference_rows": reference.size,
        },
        "libraries": library_versions(),
        "parent": parent if parent is not None else registry.current_version(),
        "training_seconds": round(time.perf_counter() - started, 2),
        "fit_seconds": round(fit_seconds, 2),
    }
    version = registry.register(artifacts, metadata)
    steps.update()
    steps.close()

    promoted = promote == "always" or (promote == "if-none" and registry.current_version() is None)
    if promoted:
        registry.promote(version.version)
    log.info(
        "model_trained",
        model_version=version.version,
        accuracy=report["accuracy"],
        ece=report["ece"],
        promoted=promoted,
        seconds=metadata["training_seconds"],
    )
    return TrainingResult(registry.get(version.version), report, promoted)
