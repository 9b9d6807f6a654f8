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
                    "id": "01a2343a47bd7d31ac5af173fedf016d",
                    "sentiment": "positive",
                    "confidence": 0.93,
                    "probabilities": {"negative": 0.07, "positive": 0.93},
                    "model_version": "v20261127T025143Z-05762d",
                }
            ]
        },
    )
    id: str = Field(
        description="Prediction id: a UUIDv7 as 32 hex digits (time-ordered); quote it when sending feedback."
    )
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
    id: int | None = Field(None, description="The check's id: `GET /v1/drift/checks/{id}`.")
    estimated_accuracy: float | None = Field(
        None, description="The window's accuracy estimated from the model's confidence (no labels); full windows only."
    )
    estimated_accuracy_low: float | None = Field(None, description="Lower end of its 95 % band.")
    estimated_accuracy_high: float | None = Field(None, description="Upper end of its 95 % band.")
    explained: bool = Field(False, description="An explanation of the drift is stored with the check.")


class AccuracyEstimateOut(BaseModel):
    """A label-free accuracy estimate (a share, 0.81 not 81) and the 95 % band the realised accuracy should
    fall in if the model's probabilities are calibrated on the traffic."""

    estimate: float
    low: float
    high: float
    window_size: int = Field(description="Predictions (or reference rows) behind it.")
    method: str = Field(description='The estimator: "confidence" (mean probability of the predicted label).')


class EstimatedAccuracyOut(AccuracyEstimateOut):
    """The latest full window's estimate, next to the same estimate on its version's held-out reference."""

    model_config = ConfigDict(protected_namespaces=())
    check_id: int
    checked_at: datetime
    model_version: str
    reference: AccuracyEstimateOut | None = Field(description="The version's reference estimate.")
    drop_points: float | None = Field(description="Percentage points the window's estimate lies below the reference's.")


class LiveAccuracyOut(BaseModel):
    """Realised accuracy from feedback labels."""

    accuracy: float | None = Field(description="Accuracy over the latest labelled predictions (null: none yet).")
    labelled: int = Field(description="Labelled predictions behind it.")
    window: int = Field(description="Most labelled predictions it counts (`SENTIMENT_LIVE_ACCURACY_WINDOW`).")


class TermOut(BaseModel):
    """An n-gram whose share of texts differs between the window and the reference."""

    term: str = Field(description='A lower-cased word or two-word n-gram, as plain text ("this dress").')
    window_rate: float = Field(description="Share of window texts containing it.")
    reference_rate: float = Field(description="Share of reference texts containing it.")
    log_ratio: float = Field(description="Natural log of the smoothed window rate over the reference rate.")
    z: float = Field(description="Signed root of the likelihood-ratio statistic (> 0: over-represented).")


class ExampleOut(BaseModel):
    text: str = Field(description="A live text of the window, verbatim.")
    score: float = Field(description="The domain classifier's out-of-fold P(window) for it (0.5: undecided).")


class DriftExplanationOut(BaseModel):
    """What separates a flagged window from the reference (app/monitoring/explain.py)."""

    format_version: int
    domain_auc: float = Field(description="Cross-validated ROC AUC of a classifier telling window from reference.")
    domain_auc_folds: list[float]
    window_rows: int
    reference_rows: int
    features: int
    examples: list[ExampleOut] = Field(description="The live texts least like the reference, least like it first.")
    over_represented: list[TermOut] | None = Field(description="null: the reference keeps no texts to compare.")
    under_represented: list[TermOut] | None
    terms_tested: int
    term_z_threshold: float | None
    reference_term_texts: int
    seconds: float = Field(description="Time the drift monitor took to compute it.")


class ExplainedCheckOut(BaseModel):
    """The latest check that flagged drift with an explanation."""

    model_config = ConfigDict(protected_namespaces=())
    check_id: int
    checked_at: datetime
    model_version: str
    explanation: DriftExplanationOut


class DriftCheckDetailOut(DriftCheckOut):
    """One drift check and its explanation (null: none stored)."""

    explanation: DriftExplanationOut | None


class DriftOut(BaseModel):
    """Current drift status and the most recent checks, newest first."""

    current: DriftSummary
    history: list[DriftCheckOut]
    estimated_accuracy: EstimatedAccuracyOut | None = Field(
        None, description="The latest full window's label-free accuracy estimate (null: none yet)."
    )
    live_accuracy: LiveAccuracyOut | None = None
    explanation: ExplainedCheckOut | None = Field(
        None, description="The latest check that flagged drift and was explained (null: none)."
    )


class FeedbackIn(BaseModel):
    """The true label of an earlier prediction."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prediction_id": "01a2343a47bd7d31ac5af173fedf016d", "label": "negative"}]},
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


class ModelEventOut(BaseModel):
    """One lifecycle event of a model version (app/storage/model_events.py)."""

    occurred_at: datetime
    event: str = Field(
        description="registered, gated, shadowed, promoted, rejected, superseded, rolled_back or watch_passed"
    )
    trigger: str | None = Field(description="What caused it: the retrain's trigger, watch, rollback; null if none")
    actor: str = Field(description="Who did it: retrain:<job id>, cli, monitor")
    details: dict[str, Any] = Field(description="The figures behind it (gate, shadow, watch figures, reason)")


class ModelEventsOut(BaseModel):
    """A model version's audit trail, oldest event first."""

    version: str
    events: list[ModelEventOut]


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
        description="retrain_started, already_running, cooldown, duplicate, ignored or skipped_harmless_drift (the "
        "drift alert with SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS set, while the estimated accuracy has not "
        "dropped that far); with SENTIMENT_RETRAIN_MODE=queue, queued or already_queued instead of retrain_started "
        "and already_running"
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
