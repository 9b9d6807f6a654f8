"""Every setting of the service, read from ``SENTIMENT_*`` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """Service configuration; each field is the env var ``SENTIMENT_<FIELD>`` upper-cased."""

    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", extra="ignore", frozen=True)

    @property
    def prediction_log_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'predictions.db'}"

    def as_env(self) -> dict[str, str]:
        """These settings as ``SENTIMENT_*`` variables, for a child process (a retrain) to read back."""
        env = {}
        for name, raw in self.model_dump().items():
            value = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list | dict):
                text = json.dumps(value)
            else:
                text = str(value)
            env[f"SENTIMENT_{name.upper()}"] = text
        return env

    def secret(self, name: str) -> str | None:
        """A secret from its ``<name>`` setting or, failing that, the file named by ``<name>_file``."""
        value: SecretStr | str | None = getattr(self, name)
        if value is not None:
            return value.get_secret_value() if isinstance(value, SecretStr) else value
        path: Path | None = getattr(self, f"{name}_file", None)
        if path is not None:
            return path.read_text().strip()
        return None

    # Model store and data
    model_store: Path = Field(REPO_ROOT / "model_store", description="Root of the versioned model store.")
    data_dir: Path = Field(REPO_ROOT / "data", description="Folder holding the labelled corpora.")
    reload_interval_seconds: PositiveFloat = Field(
        2.0, description="How often each worker checks the store's current pointer for a new version."
    )

    # Serving
    host: str = Field("127.0.0.1", description="Address gunicorn binds to (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="Port gunicorn binds to.")
    workers: PositiveInt = Field(2, description="Number of gunicorn worker processes.")
    worker_timeout_seconds: PositiveInt = Field(30, description="gunicorn worker timeout.")
    graceful_timeout_seconds: PositiveInt = Field(20, description="Time a worker gets to finish on SIGTERM.")
    keepalive_seconds: PositiveInt = Field(5, description="HTTP keep-alive timeout.")
    inference_max_batch: PositiveInt = Field(
        128, description="Most texts one model call handles when concurrent requests are batched together."
    )

    # Input limits
    max_text_chars: PositiveInt = Field(5000, description="Longest accepted text, in characters.")
    max_batch_size: PositiveInt = Field(256, description="Most texts accepted in one batch request.")
    max_body_bytes: PositiveInt = Field(1_048_576, description="Largest accepted request body, in bytes.")

    # Monitoring: prediction log, metrics, feedback
    state_dir: Path = Field(
        REPO_ROOT / "var", description="Folder for the default SQLite prediction log and the workers' model-load lock."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the prediction log; default sqlite:///<state_dir>/predictions.db."
    )
    monitoring_enabled: bool = Field(True, description="Record metrics and log predictions (off only to benchmark).")
    prediction_log_flush_seconds: PositiveFloat = Field(
        0.5, description="How often each worker writes its buffered predictions to the log."
    )
    prediction_log_max_buffer: PositiveInt = Field(
        50_000, description="Most unwritten predictions a worker keeps while the database is unavailable."
    )
    retention_max_rows: PositiveInt = Field(1_000_000, description="Most unlabelled predictions kept.")
    retention_max_age_hours: PositiveFloat = Field(168.0, description="Oldest unlabelled prediction kept.")
    live_accuracy_window: PositiveInt = Field(500, description="Labelled predictions behind sentiment_live_accuracy.")

    # Drift monitor
    drift_window_size: PositiveInt = Field(500, description="Latest predictions tested against the reference.")
    drift_check_interval_seconds: PositiveFloat = Field(
        10.0, description="Longest time between drift checks while new predictions arrive."
    )
    drift_check_every_predictions: PositiveInt = Field(
        100, description="Also check as soon as this many new predictions arrived."
    )
    drift_p_value: float = Field(0.05, gt=0, lt=1, description="Family-wise significance of the drift verdict.")
    drift_permutations: PositiveInt = Field(100, description="Permutations of the MMD test.")
    drift_status_refresh_seconds: PositiveFloat = Field(
        1.0, description="How often each worker refreshes the drift summary it adds to predictions."
    )

    # Alert webhooks and retraining
    webhook_token: SecretStr | None = Field(None, description="Bearer token alert webhooks must present.")
    webhook_token_file: Path | None = Field(None, description="File holding the webhook bearer token.")
    webhook_basic_username: str | None = Field(None, description="Basic-auth user webhooks may present instead.")
    webhook_basic_password: SecretStr | None = Field(None, description="Basic-auth password for webhooks.")
    grafana_hmac_secret: SecretStr | None = Field(None, description="Secret of Grafana's webhook HMAC signature.")
    grafana_hmac_secret_file: Path | None = Field(None, description="File holding the Grafana HMAC secret.")
    grafana_signature_header: str = Field("X-Grafana-Alerting-Signature", description="Header of the signature.")
    grafana_timestamp_header: str | None = Field(
        None, description='Header with the signing time; then the signature covers "<timestamp>:<body>".'
    )
    grafana_replay_window_seconds: PositiveInt = Field(300, description="Oldest signed timestamp accepted.")
    allow_unauthenticated_webhooks: bool = Field(
        False, description="Development only: accept webhooks without credentials when none are configured."
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token of the admin (retrain) endpoints.")
    admin_token_file: Path | None = Field(None, description="File holding the admin token.")
    retrain_alert_names: list[str] = Field(
        ["SentimentDriftDetected"], description="Alert names whose firing notifications start a retrain."
    )
    retrain_cooldown_seconds: float = Field(600.0, ge=0, description="Least time between two retrain starts.")
    retrain_promotion_margin: float = Field(
        0.01, ge=0, le=1, description="Most balanced accuracy a candidate may lose on the base holdout."
    )
    retrain_feedback_holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of feedback labels held out to judge candidates."
    )
    retrain_feedback_weight: float = Field(
        0.25, gt=0, lt=1, description="Share of the training weight given to feedback rows (the rest: base corpus)."
    )
    retrain_min_labels: PositiveInt = Field(50, description="Fewest new feedback labels worth a retrain.")

    # Logs
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
