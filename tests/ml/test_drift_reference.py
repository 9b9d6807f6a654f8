"""The drift reference's stored form: arrays and JSON read without pickle, legacy pickles still read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.decomposition import TruncatedSVD

from app.ml.drift_reference import (
    ARRAYS_ARTIFACT,
    FORMAT_VERSION,
    LEGACY_ARTIFACT,
    SUMMARY_ARTIFACT,
    DriftReference,
    DriftReferenceFormatError,
    DriftReferenceMissingError,
    embed,
    load_reference,
    project,
    reference_artifacts,
)
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, LoadedModel, ModelRegistry


@pytest.fixture
def current(store: ModelRegistry) -> LoadedModel:
    model = store.load_current()
    assert model is not None
    return model


@pytest.fixture
def window(current: LoadedModel) -> list[str]:
    """Held-out texts of the current version, as a live window might bring them."""
    return list(current.read_json(REFERENCE_ARTIFACT)["texts"][:200])


def save(reference: DriftReference, directory: Path) -> Path:
    directory.mkdir()
    for name, write in reference_artifacts(reference).items():
        write(directory / name)
    return directory


def test_the_projection_is_truncated_svds_transform(current: LoadedModel, window: list[str]) -> None:
    """Dropping the fitted TruncatedSVD for its components changes no embedding, sparse input included."""
    features = current.model.features(window)
    reducer = TruncatedSVD(n_components=8, random_state=0).fit(features)
    assert np.array_equal(project(features, reducer.components_), reducer.transform(features).astype(np.float32))
    assert np.array_equal(project(features.tocoo(), reducer.components_), project(features, reducer.components_))


def test_training_stores_the_reference_as_arrays_and_json(current: LoadedModel) -> None:
    """A trained version lists the two new artifacts (so the store verifies them) and no pickle."""
    artifacts = current.metadata["artifacts"]
    assert {ARRAYS_ARTIFACT, SUMMARY_ARTIFACT} <= set(artifacts) and LEGACY_ARTIFACT not in artifacts
    summary = json.loads((current.path / SUMMARY_ARTIFACT).read_text())
    assert (
        summary["format_version"] == FORMAT_VERSION
        and summary["size"] == current.metadata["data"]["drift_reference_rows"]
    )


def test_round_trip_needs_no_pickle_and_embeds_identically(
    current: LoadedModel, window: list[str], tmp_path: Path
) -> None:
    """Saved, then loaded with pickling refused: same arrays, same figures, same embeddings of a window."""
    reference = load_reference(current)
    directory = save(reference, tmp_path / "saved")
    with np.load(directory / ARRAYS_ARTIFACT, allow_pickle=False) as arrays:
        assert set(arrays.files) == {"components", "embeddings", "lengths", "confidence"}
    reloaded = load_reference(directory)
    for name in ("components", "embeddings", "lengths", "confidence"):
        assert np.array_equal(getattr(reloaded, name), getattr(reference, name))
        assert getattr(reloaded, name).dtype == getattr(reference, name).dtype
    assert (reloaded.size, reloaded.positive_rate) == (reference.size, reference.positive_rate)
    assert np.array_equal(
        embed(current.model, reloaded.components, window), embed(current.model, reference.components, window)
    )


def legacy_reference(current: LoadedModel, texts: list[str]) -> tuple[object, TruncatedSVD]:
    """A reference as versions before the array format pickled it: the dataclass with a fitted reducer."""
    features = current.model.features(texts)
    reducer = TruncatedSVD(n_components=8, random_state=0).fit(features)
    p_positive = current.model.p_positive(texts)
    legacy = object.__new__(DriftReference)  # pickles under the same class name, with the old fields
    legacy.__dict__.update(
        reducer=reducer,
        embeddings=np.asarray(reducer.transform(features), dtype=np.float32),
        lengths=np.array([len(t) for t in texts], dtype=np.float64),
        confidence=np.maximum(p_positive, 1.0 - p_positive),
        positive_rate=float((p_positive >= 0.5).mean()),
        size=len(texts),
    )
    return legacy, reducer


def copy_of(source: Path) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(source.read_bytes())

    return write


def test_a_legacy_drift_joblib_still_loads_from_a_verified_version(
    store: ModelRegistry, current: LoadedModel, window: list[str]
) -> None:
    """Versions registered before the array format keep being monitored, with the same embeddings."""
    legacy, reducer = legacy_reference(current, window)
    meta = {k: v for k, v in current.metadata.items() if k not in ("artifacts", "version", "stage", "created_at")}
    old = store.register(
        {
            MODEL_ARTIFACT: copy_of(current.path / MODEL_ARTIFACT),
            LEGACY_ARTIFACT: lambda path: joblib.dump(legacy, path, compress=3),
        },
        meta,
    )
    reference = load_reference(store.load(old.version))
    assert np.array_equal(reference.components, reducer.components_)
    assert (reference.size, reference.positive_rate) == (len(window), legacy.positive_rate)  # type: ignore[attr-defined]
    features = current.model.features(window)
    assert np.array_equal(embed(current.model, reference.components, window), reducer.transform(features))
    with pytest.raises(DriftReferenceMissingError, match=r"ModelRegistry\.load"):
        load_reference(old.path)  # a bare folder: nothing verified its sha256, so no unpickling


def test_an_unknown_format_version_is_refused(current: LoadedModel, tmp_path: Path) -> None:
    """A reference written by a newer release fails with a clear error, never as garbage figures."""
    directory = save(load_reference(current), tmp_path / "future")
    summary_path = directory / SUMMARY_ARTIFACT
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DriftReferenceFormatError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_reference(directory)


def test_inconsistent_arrays_are_refused(current: LoadedModel, tmp_path: Path) -> None:
    """A summary that does not describe its arrays is a broken artifact, not a smaller reference."""
    directory = save(load_reference(current), tmp_path / "inconsistent")
    summary_path = directory / SUMMARY_ARTIFACT
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "size": summary["size"] - 1}))
    with pytest.raises(DriftReferenceFormatError, match="embeddings has shape"):
        load_reference(directory)


def test_a_version_without_reference_says_so(tmp_path: Path) -> None:
    """No reference at all is its own error (the monitor reports it and retries later)."""
    with pytest.raises(DriftReferenceMissingError, match="no drift reference"):
        load_reference(tmp_path)
