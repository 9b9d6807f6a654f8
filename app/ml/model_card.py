"""The model card: what every version records about its model, built in one place for training and retraining.

A version holds the model (saved by itself), the held-out rows it was evaluated on (``reference.json``),
the drift reference, the evaluation report and ``metadata.json``: metrics, data description and
fingerprints, model kind and parameters, library versions and parent, plus what the caller adds (the
promotion gate and job of a retrain, timings, cross-validation).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from app.ml.data import Corpus
from app.ml.drift_reference import DriftReference, reference_artifacts
from app.ml.evaluate import classification_report, plot_confusion_matrix, plot_reliability
from app.ml.model import SentimentModel
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, ArtifactWriter, ModelRegistry, ModelVersion, Stage

LIBRARIES = ("scikit-learn", "nltk", "numpy", "scipy", "joblib")


@dataclass(frozen=True)
class RegisteredVersion:
    """A version the builder registered, and the evaluation report its card was made from."""

    version: ModelVersion
    report: dict[str, Any]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a persisted model depends on (unpickling needs the same ones)."""
    return {"python": platform.python_version(), **{name: package_version(name) for name in LIBRARIES}}


def _write_json(payload: Mapping[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    return write


def version_artifacts(
    model: SentimentModel, report: dict[str, Any], holdout: Corpus, reference: DriftReference
) -> dict[str, ArtifactWriter]:
    """The files of a model version: the model, held-out rows, drift reference and the report."""
    return {
        MODEL_ARTIFACT: model.save,
        REFERENCE_ARTIFACT: _write_json({"texts": holdout.texts, "labels": holdout.labels.tolist()}),
        **reference_artifacts(reference),
        "report/metrics.json": _write_json(report),
        "report/confusion_matrix.png": lambda path: plot_confusion_matrix(report, path, holdout.name),
        "report/reliability.png": lambda path: plot_reliability(report, path, holdout.name),
    }


def register_version(
    registry: ModelRegistry,
    model: SentimentModel,
    *,
    fit: Corpus,
    holdout: Corpus,
    reference: DriftReference,
    data: Mapping[str, Any],
    parent: str | None,
    extra: Mapping[str, Any] | None = None,
    report_extra: Mapping[str, Any] | None = None,
    stage: Stage = "candidate",
) -> RegisteredVersion:
    """Evaluate the fitted ``model`` on ``holdout`` and register it with its card.

    ``fit`` is every row the model was fitted on and ``holdout`` rows it never saw; ``data`` describes
    where they came from (``base_corpus``: the :data:`app.ml.data.CORPORA` name a retrain reloads);
    the card adds their sizes and fingerprints. ``extra`` goes into the metadata as it is, and
    ``report_extra`` into the report (``report/metrics.json`` and the metadata's ``metrics``).
    """
    report = {**classification_report(holdout.labels, model.p_positive(holdout.texts)), **(report_extra or {})}
    metadata = {
        "metrics": {k: v for k, v in report.items() if k != "reliability"},
        "model": {"kind": model.kind},
        "params": model.params_dict(),
        "data": {
            **data,
            "fit_rows": len(fit),
            "fit_fingerprint": fit.fingerprint,
            "holdout_rows": len(holdout),
            "holdout_fingerprint": holdout.fingerprint,
            "drift_reference_rows": reference.size,
        },
        "libraries": library_versions(),
        "parent": parent,
        **(extra or {}),
    }
    version = registry.register(version_artifacts(model, report, holdout, reference), metadata, stage=stage)
    return RegisteredVersion(version, report)
