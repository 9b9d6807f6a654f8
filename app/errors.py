"""The service's domain errors: one base class, free of HTTP (``app/api/errors.py`` maps them)."""

from __future__ import annotations

from typing import Any


class SentimentServiceError(Exception):
    """Base of every error the service raises on purpose; ``code`` is stable for clients."""

    code = "service_error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ModelNotReadyError(SentimentServiceError):
    """No verified model is loaded, so nothing can be predicted."""

    code = "model_not_ready"


class VersionNotFoundError(SentimentServiceError):
    """The named model version is not in the store."""

    code = "version_not_found"


class ArtifactIntegrityError(SentimentServiceError):
    """A stored artifact is missing or its sha256 differs from the one recorded at registration."""

    code = "artifact_integrity"


class ModelStoreError(SentimentServiceError):
    """The model store cannot do what was asked (nothing to roll back to, bad layout, ...)."""

    code = "model_store_error"


class InvalidInputError(SentimentServiceError):
    """The client's input is well-formed JSON but not acceptable."""

    code = "invalid_input"


class UnsupportedMediaTypeError(SentimentServiceError):
    """The request body is not JSON."""

    code = "unsupported_media_type"


class PredictionNotFoundError(SentimentServiceError):
    """No logged prediction has this id."""

    code = "prediction_not_found"


class FeedbackConflictError(SentimentServiceError):
    """The prediction already carries a different label."""

    code = "feedback_conflict"


class StorageUnavailableError(SentimentServiceError):
    """The prediction log cannot be reached right now."""

    code = "storage_unavailable"


class JobNotFoundError(SentimentServiceError):
    """No retrain job has this id."""

    code = "job_not_found"


class DriftCheckNotFoundError(SentimentServiceError):
    """No stored drift check has this id (never, or pruned)."""

    code = "drift_check_not_found"


class ModelSignatureError(ArtifactIntegrityError):
    """A signing key is configured and the version's signature is missing or does not verify with it."""

    code = "model_signature_invalid"


class CurrentVersionChangedError(ModelStoreError):
    """A promotion expected another version to be current (an operator promoted or rolled back meanwhile)."""

    code = "current_version_changed"


class ArtifactExistsError(ModelStoreError):
    """An artifact store already holds (part of) this version: versions are immutable, never overwritten."""

    code = "artifact_exists"
