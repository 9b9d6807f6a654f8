"""Request and response bodies of the REST API (JSON), with the examples shown at ``/docs``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must contain a non-whitespace character")
    if "\x00" in text:  # the prediction log (PostgreSQL text) cannot store it
        raise ValueError("text must not contain NUL characters (U+0000)")
    return text


def text_type(max_chars: int) -> Any:
    """A client text: 1 to ``max_chars`` characters, not only whitespace, without NUL characters."""
    return Annotated[
        str,
        StringConstraints(min_length=1, max_length=max_chars),
        AfterValidator(_not_blank),
        Field(description=f"Text to classify, 1 to {max_chars} characters, not only whitespace, no NUL (U+0000)."),
    ]


def request_models(max_chars: int, max_batch: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request bodies carrying the configured limits, so validation and ``/docs`` both state them."""
    Text = text_type(max_chars)

    class PredictRequest(BaseModel):
        """One text to classify."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"text": "A gripping, beautifully acted film."}]},
        )
        text: Text  # type: ignore[valid-type]  # built from settings at runtime

    class BatchPredictRequest(BaseModel):
        """Up to the configured number of texts to classify in one call."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"texts": ["Loved every minute.", "Dull and far too long."]}]},
        )
        texts: Annotated[list[Text], Field(min_length=1, max_length=max_batch)]  # type: ignore[valid-type]

    return PredictRequest, BatchPredictRequest


class Probabilities(BaseModel):
    negative: float
    positive: float


class PredictionOut(BaseModel):
    """A prediction: label, its probability, both class probabilities, and the model that made it."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "id": "5b0f3c8e9d2a4f61a7c3e1d09b8f7a65",
                    "sentiment": "positive",
                    "confidence": 0.93,
                    "probabilities": {"negative": 0.07, "positive": 0.93},
                    "model_version": "v20261127T025143Z-05762d",
                }
            ]
        },
    )
    id: str = Field(description="Prediction id; quote it when sending feedback.")
    sentiment: str = Field(description='"positive" or "negative".')
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted label.")
    probabilities: Probabilities
    model_version: str


class DriftSummary(BaseModel):
    """The latest drift check, as every prediction response carries it."""

    drift: bool = Field(description="The monitor's combined verdict.")
    p_value: float | None = Field(description="p-value of the MMD test.")
    score: float | None = Field(description="MMD distance of the live window to the reference.")
    checked_at: datetime | None = Field(description="When the check ran (UTC).")
    status: str = Field(description='"drift", "no_drift", "insufficient_data" or "unknown" (no check yet).')


class PredictionWithDriftOut(PredictionOut):
    drift: DriftSummary


class BatchPredictionOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    predictions: list[PredictionOut]
    model_version: str
    drift: DriftSummary


class DriftCheckOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    checked_at: datetime | None
    model_version: str
    status: str
    drift: bool
    score: float | None
    p_value: float | None
    threshold: float | None
    window_size: int
    confidence_mean: float | None
    details: dict[str, Any]


class DriftOut(BaseModel):
    """Current drift status and the most recent checks, newest first."""

    current: DriftSummary
    history: list[DriftCheckOut]


class FeedbackIn(BaseModel):
    """The true label of an earlier prediction."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prediction_id": "5b0f3c8e9d2a4f61a7c3e1d09b8f7a65", "label": "negative"}]},
    )
    prediction_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    label: Literal["negative", "positive"]


class FeedbackOut(BaseModel):
    prediction_id: str
    label: str
    predicted: str
    correct: bool
    already_recorded: bool = Field(description="The same label had been sent before (nothing changed).")
    live_accuracy: float | None = Field(description="Accuracy over the latest labelled predictions.")


class ModelVersionOut(BaseModel):
    """A registered model version as the model store records it."""

    model_config = ConfigDict(protected_namespaces=())
    version: str
    stage: str
    current: bool
    created_at: datetime | None = None
    parent: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    libraries: dict[str, str] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)


class ModelListOut(BaseModel):
    current: str | None
    versions: list[ModelVersionOut]


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    status: str
    model_version: str | None = None


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody


class WebhookOut(BaseModel):
    """What a notification (or a manual retrain request) did."""

    status: str = Field(
        description="retrain_started, already_running, cooldown, duplicate or ignored; with "
        "SENTIMENT_RETRAIN_MODE=queue, queued or already_queued instead of retrain_started and already_running"
    )
    job_id: str | None = None
    alerts: int = Field(0, description="Alerts of the notification that matter (firing, configured name).")
    detail: str = ""
    retry_after_seconds: float | None = Field(None, description="With cooldown: when a retrain may start.")


class RetrainJobOut(BaseModel):
    id: str
    trigger: str
    reason: str
    status: str = Field(description="queued (waiting for a retrain worker), running, succeeded or failed")
    outcome: str | None = Field(description="promoted, rejected, skipped_no_new_labels, skipped_too_few_labels, failed")
    started_at: datetime | None
    finished_at: datetime | None
    candidate_version: str | None
    details: dict[str, Any]
