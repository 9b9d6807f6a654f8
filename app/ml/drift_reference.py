"""The drift reference saved with each model version: how held-out, in-domain traffic looks to that model.

The representation is the model's own features (:meth:`SentimentModel.features`) projected onto the
components of a TruncatedSVD fitted on the rows the model was fitted on; the reference sample is held-out
rows that neither the model nor the reducer ever saw (a reference drawn from fitted rows looks unlike any
new traffic: the model is more confident on it and meets no unseen words, so every live window would seem
to drift). Only the SVD's components are kept: ``TruncatedSVD.transform`` is ``X @ components_.T``.

Stored format (:data:`FORMAT_VERSION` 1), two artifacts read without unpickling anything:

- ``drift_reference.npz``: arrays ``components`` (k, n_features), ``embeddings`` (size, k) float32,
  ``lengths`` (size,) and ``confidence`` (size,) float64, written and read with ``allow_pickle=False``;
- ``drift_reference.json``: ``format_version``, ``size``, ``positive_rate``, ``components`` (k),
  ``features`` (n_features).

Versions registered before this format hold ``drift.joblib``, a pickled ``DriftReference`` with a fitted
``TruncatedSVD`` in ``reducer``; :func:`load_reference` still reads it, only from a version the store has
verified, and converts it. That is why this class keeps its name, module and plain ``__dict__``: the old
pickles name it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from sklearn.decomposition import TruncatedSVD

from app.errors import SentimentServiceError
from app.ml.model import SentimentModel, confidence_of, decide
from app.ml.registry import LoadedModel

FORMAT_VERSION = 1
"""Version of the stored format this release writes; it reads every version up to this one."""
ARRAYS_ARTIFACT = "drift_reference.npz"
SUMMARY_ARTIFACT = "drift_reference.json"
LEGACY_ARTIFACT = "drift.joblib"
"""The pickled reference of versions registered before :data:`FORMAT_VERSION` 1."""
_ARRAYS = ("components", "embeddings", "lengths", "confidence")


class DriftReferenceMissingError(SentimentServiceError):
    """The version was registered without a drift reference (trained before drift monitoring)."""

    code = "drift_reference_missing"


class DriftReferenceFormatError(SentimentServiceError):
    """A stored drift reference is of a format this release cannot read, or inconsistent."""

    code = "drift_reference_format"


@dataclass(frozen=True, eq=False)
class DriftReference:
    """Everything the drift monitor compares a live window with, for one model version."""

    components: NDArray[np.floating[Any]]  # (k, n_features): the reducer, as a projection (see :func:`project`)
    embeddings: NDArray[np.float32]  # (size, k): projected features of the reference texts
    lengths: NDArray[np.float64]  # characters per reference text
    confidence: NDArray[np.float64]  # the model's confidence on each reference text
    positive_rate: float  # share of reference texts the model calls positive
    size: int


def project(features: Any, components: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
    """``TruncatedSVD.transform`` without the estimator: features (sparse or dense) @ components.T.

    Fortran-ordered ``components`` (as :func:`build_reference` and :func:`load_reference` make them) are
    multiplied in place: scipy copies a ``components.T`` that is not C-contiguous, n_features x k x 8 bytes
    (about 50 MB) per call.
    """
    if features.shape[1] != components.shape[1]:
        raise DriftReferenceFormatError(
            f"the model has {features.shape[1]} features, the drift reference {components.shape[1]}"
        )
    if sparse.issparse(features):
        features = features if features.format in ("csr", "csc") else features.tocsr()  # as sklearn's check
    else:
        features = np.asarray(features)
    return np.asarray(features @ components.T, dtype=np.float32)


def embed(model: SentimentModel, components: NDArray[np.floating[Any]], texts: Sequence[str]) -> NDArray[np.float32]:
    """Texts -> the model's features -> their projection onto the reference's components."""
    return project(model.features(list(texts)), components)


def build_reference(
    model: SentimentModel,
    fit_texts: Sequence[str],
    reference_texts: Sequence[str],
    reference_proba: NDArray[np.float64],
    *,
    components: int = 32,
    seed: int = 0,
) -> DriftReference:
    """Fit the reducer on the model's fitted rows; describe the held-out ``reference_texts`` with it.

    ``reference_proba`` is the model's P(positive) for each reference text.
    """
    reducer = TruncatedSVD(n_components=components, random_state=seed).fit(model.features(list(fit_texts)))
    basis = np.asfortranarray(reducer.components_)  # stored so, and read back so without a copy
    positive = np.asarray(reference_proba, dtype=np.float64)
    return DriftReference(
        components=basis,
        embeddings=embed(model, basis, reference_texts),
        lengths=np.array([len(t) for t in reference_texts], dtype=np.float64),
        confidence=confidence_of(positive),
        positive_rate=float(decide(positive).mean()),
        size=len(reference_texts),
    )


# -- storing ----------------------------------------------------------------------------------------------
def _summary(reference: DriftReference) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "size": reference.size,
        "positive_rate": reference.positive_rate,
        "components": int(reference.components.shape[0]),
        "features": int(reference.components.shape[1]),
    }


def _write_arrays(reference: DriftReference, path: Path) -> None:
    # np.savez_compressed's own layout (one .npy per array in a deflated zip), with pickling refused.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in _ARRAYS:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.save(member, getattr(reference, name), allow_pickle=False)


def reference_artifacts(reference: DriftReference) -> dict[str, Callable[[Path], None]]:
    """The version artifacts that store ``reference``: file name -> writer (for ``ModelRegistry.register``)."""
    summary = json.dumps(_summary(reference), indent=2, sort_keys=True) + "\n"
    return {
        ARRAYS_ARTIFACT: lambda path: _write_arrays(reference, path),
        SUMMARY_ARTIFACT: lambda path: path.write_text(summary),
    }


# -- loading ----------------------------------------------------------------------------------------------
def load_reference(source: Path | LoadedModel) -> DriftReference:
    """The drift reference of a version folder, or of a version the store loaded (and so verified).

    Reads the current format from either; from a :class:`LoadedModel`, only bytes whose sha256 matches
    its verified metadata (:meth:`LoadedModel.artifact_bytes`). The legacy ``drift.joblib`` is a pickle: it
    is read only from a :class:`LoadedModel` whose metadata lists it, from such verified bytes. Raises
    :class:`DriftReferenceMissingError` when there is no reference, :class:`DriftReferenceFormatError` for
    a format version newer than :data:`FORMAT_VERSION` or inconsistent arrays.
    """
    if isinstance(source, LoadedModel):
        where, name = str(source.path or source.version), source.version  # no folder: in an object store
        present = set(source.metadata.get("artifacts", {}))  # what the store verified
        read: Callable[[str], bytes] = source.artifact_bytes
    else:
        directory, name = source, source.name
        where = str(directory)
        present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
        read = lambda artifact: (directory / artifact).read_bytes()  # noqa: E731
    if {ARRAYS_ARTIFACT, SUMMARY_ARTIFACT} <= present:
        return _read(where, read)
    if LEGACY_ARTIFACT in present and isinstance(source, LoadedModel):
        return _read_legacy(source.artifact_bytes(LEGACY_ARTIFACT))
    if LEGACY_ARTIFACT in present:
        raise DriftReferenceMissingError(
            f"{name} holds only the legacy {LEGACY_ARTIFACT} (a pickle): load it through ModelRegistry.load"
        )
    raise DriftReferenceMissingError(f"{name} has no drift reference; retrain to monitor it")


def _read(where: str, read: Callable[[str], bytes]) -> DriftReference:
    summary = json.loads(read(SUMMARY_ARTIFACT))
    version = summary.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise DriftReferenceFormatError(
            f"{where}/{SUMMARY_ARTIFACT}: format_version {version!r} is not one this release reads "
            f"(1 to {FORMAT_VERSION}); upgrade the service to monitor this version",
            details={"format_version": version, "supported": FORMAT_VERSION},
        )
    with np.load(io.BytesIO(read(ARRAYS_ARTIFACT)), allow_pickle=False) as arrays:
        loaded = {name: arrays[name] for name in _ARRAYS}
    loaded["components"] = np.asfortranarray(loaded["components"])  # a copy only for C-ordered (older) files
    reference = DriftReference(**loaded, positive_rate=float(summary["positive_rate"]), size=int(summary["size"]))
    expected = {
        "components": (summary["components"], summary["features"]),
        "embeddings": (reference.size, summary["components"]),
        "lengths": (reference.size,),
        "confidence": (reference.size,),
    }
    for array, shape in expected.items():
        if loaded[array].shape != tuple(shape):
            raise DriftReferenceFormatError(
                f"{where}/{ARRAYS_ARTIFACT}: {array} has shape {loaded[array].shape}, expected {tuple(shape)}"
            )
    return reference


def _read_legacy(data: bytes) -> DriftReference:
    # Unpickles as this class with the old fields in __dict__ (pickle restores __dict__, never __init__).
    state = vars(joblib.load(io.BytesIO(data)))
    return DriftReference(
        components=np.asfortranarray(state["reducer"].components_),
        embeddings=np.asarray(state["embeddings"], dtype=np.float32),
        lengths=np.asarray(state["lengths"], dtype=np.float64),
        confidence=np.asarray(state["confidence"], dtype=np.float64),
        positive_rate=float(state["positive_rate"]),
        size=int(state["size"]),
    )
