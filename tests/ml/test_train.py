"""Training: a real model, a holdout it never saw, and a complete version record."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from app.ml.data import Corpus
from app.ml.pipeline import ModelParams
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, ModelRegistry, sha256_file
from app.ml.train import TrainingResult, split_holdout, train_and_register
from tests.conftest import SMALL_PARAMS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_holdout_is_stratified_and_disjoint_from_fit_rows(small_corpus: Corpus) -> None:
    fit, holdout = split_holdout(small_corpus, 0.2, seed=0)
    # A partition: every corpus row lands on exactly one side.
    assert Counter(fit.texts) + Counter(holdout.texts) == Counter(small_corpus.texts)
    assert len(holdout) == 600
    assert abs(fit.labels.mean() - holdout.labels.mean()) < 0.02


def test_small_model_learns_sentiment(trained: TrainingResult) -> None:
    # 3,000 real rows: far above the 58 % majority baseline, calibrated within a few points.
    assert trained.report["accuracy"] > 0.68
    assert trained.report["roc_auc"] > 0.75
    assert trained.report["ece"] < 0.08


def test_version_records_metrics_data_params_libraries_and_hashes(trained: TrainingResult) -> None:
    meta = trained.version.metadata
    assert meta["stage"] == "production" and trained.promoted
    assert meta["metrics"]["accuracy"] == trained.report["accuracy"]
    assert meta["data"]["fit_rows"] + meta["data"]["holdout_rows"] == meta["data"]["rows"]
    assert meta["data"]["fit_fingerprint"] != meta["data"]["holdout_fingerprint"]
    assert meta["params"]["C"] == ModelParams().C
    assert {"scikit-learn", "nltk", "numpy", "python"} <= meta["libraries"].keys()
    assert meta["parent"] is None and meta["created_at"]
    for name, digest in meta["artifacts"].items():
        assert sha256_file(trained.version.path / name) == digest
    assert {MODEL_ARTIFACT, REFERENCE_ARTIFACT, "report/metrics.json"} <= meta["artifacts"].keys()


def test_report_plots_are_png_files(trained: TrainingResult) -> None:
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (trained.version.path / "report" / name).read_bytes().startswith(PNG_MAGIC)


def test_reference_holds_exactly_the_holdout_rows(trained: TrainingResult, small_corpus: Corpus) -> None:
    reference = json.loads((trained.version.path / REFERENCE_ARTIFACT).read_text())
    _, holdout = split_holdout(small_corpus, 0.15, seed=0)
    assert reference["texts"] == holdout.texts
    assert np.array_equal(reference["labels"], holdout.labels)


def test_second_version_names_its_parent_and_is_not_promoted_by_default(tmp_path: Path, small_corpus: Corpus) -> None:
    registry = ModelRegistry(tmp_path / "store")
    first = train_and_register(registry, small_corpus.subset(range(800)), SMALL_PARAMS, progress=False)
    second = train_and_register(registry, small_corpus.subset(range(800)), SMALL_PARAMS, progress=False)
    assert first.promoted and not second.promoted
    assert second.version.metadata["parent"] == first.version.version
    assert registry.current_version() == first.version.version
    assert second.version.stage == "candidate"
