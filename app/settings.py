"""Every setting of the service, read from ``SENTIMENT_*`` environment variables."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr
from pydantic.fields import FieldInfo
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
        """A secret from its ``<name>`` setting or, failing that, the file named by ``<name>_file``, stripped
        of surrounding whitespace either way (blank: unset). An unreadable file raises :class:`ValueError`
        naming its setting."""
        value: SecretStr | str | None = getattr(self, name)
        if value is not None:
            return (value.get_secret_value() if isinstance(value, SecretStr) else value).strip() or None
        path: Path | None = getattr(self, f"{name}_file", None)
        if path is not None:
            try:
                return path.read_text().strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"SENTIMENT_{name.upper()}_FILE={path} is unreadable: {reason}") from None
        return None

    # Model store and data
    model_store: Path = Field(REPO_ROOT / "model_store", description="Root of the versioned model store.")
    data_dir: Path = Field(REPO_ROOT / "data", description="Folder holding the labelled corpora.")
    reload_interval_seconds: PositiveFloat = Field(
        2.0, description="How often each worker checks the model store's current pointer for a new version."
    )
    model_signing_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key: new versions are signed with it, and only versions whose signature "
        "verifies are loaded or promoted (`python -m app.cli sign` signs existing ones). Keep it outside the store.",
    )
    model_signing_key_file: Path | None = Field(
        None, description="File holding the model signing key; refused if it lies inside the model store."
    )
    model_store_url: str | None = Field(
        None,
        pattern=r"^(file|s3)://",
        description="Where the model store lives: `file:///path` (a folder, as `SENTIMENT_MODEL_STORE`) or "
        "`s3://bucket/prefix`: artifacts in an S3-compatible object store (app/ml/artifact_store.py) reached "
        "through `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID[_FILE]`, `AWS_SECRET_ACCESS_KEY[_FILE]` and "
        "`AWS_REGION` (default `us-east-1`), versions' records and the current pointer in the prediction "
        "database (`SENTIMENT_DATABASE_URL`, app/ml/registry_db.py); unset: the `SENTIMENT_MODEL_STORE` folder.",
    )
    model_cache_dir: Path | None = Field(
        None,
        description="Local cache of artifacts downloaded from an object store, one file per sha256 (re-verified on "
        "every read; safe to empty at any time); unset: `<state_dir>/model-cache`.",
    )

    # Serving
    host: str = Field("127.0.0.1", description="Address gunicorn binds to (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="Port gunicorn binds to.")
    workers: PositiveInt = Field(2, description="Number of gunicorn worker processes.")
    worker_timeout_seconds: PositiveInt = Field(30, description="gunicorn worker timeout.")
    graceful_timeout_seconds: PositiveInt = Field(20, description="Time a worker gets to finish on SIGTERM.")
    keepalive_seconds: PositiveInt = Field(
        5, description="HTTP keep-alive timeout; also how long a new connection may stay silent before it is closed."
    )
    body_read_timeout_seconds: PositiveFloat = Field(
        10.0,
        description="Longest a client may take to send a request's head, and then its body: past it, the request "
        "is answered `408 request_timeout` (a body) or the connection is closed (a head).",
    )
    worker_connections: PositiveInt = Field(
        4096,
        description="Most open connections and requests in progress per worker; beyond it, new requests are "
        "answered `503 server_busy` at once.",
    )
    backlog: PositiveInt = Field(2048, description="Connections the kernel queues for gunicorn before refusing.")
    inference_max_batch: PositiveInt = Field(
        128, description="Most texts one model call handles when concurrent requests are batched together."
    )

    # Input limits
    max_text_chars: PositiveInt = Field(5000, description="Longest accepted text, in characters.")
    max_batch_size: PositiveInt = Field(256, description="Most texts accepted in one batch request.")
    max_body_bytes: PositiveInt = Field(1_048_576, description="Largest accepted request body, in bytes.")

    # Monitoring: prediction log, metrics, feedback
    state_dir: Path = Field(
        REPO_ROOT / "var",
        description="Folder of the default SQLite prediction database, the workers' model-load lock and (in "
        "scripts/serve) the metrics directory.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the prediction database; unset: `sqlite:///<state_dir>/predictions.db`."
    )
    database_connect_timeout_seconds: PositiveFloat = Field(
        3.0,
        description="Longest wait to open a connection to the prediction database's server, or to get one from the "
        "pool (PostgreSQL counts whole seconds, at least 2).",
    )
    database_statement_timeout_seconds: PositiveFloat = Field(
        5.0, description="Longest a prediction-database statement may run before PostgreSQL cancels it."
    )
    database_threads: PositiveInt = Field(
        4,
        description="Threads per worker that run prediction-database calls; a hung database holds these, never the "
        "threads that serve /metrics, model reloads or webhooks.",
    )
    monitoring_enabled: bool = Field(True, description="Record metrics and log predictions (off only to benchmark).")
    metrics_write_seconds: float = Field(
        0.25,
        ge=0,
        le=60,
        description=(
            "How long each web worker gathers the request path's metric writes before writing them to the "
            "multiprocess metric files (each touched value once); 0 writes them at the end of each event-loop "
            "iteration. A scrape sees other workers' counts at most this late; a worker killed by SIGKILL loses "
            "at most this long's counts (its predictions are in the log)."
        ),
    )
    prediction_log_flush_seconds: PositiveFloat = Field(
        0.5, description="How often each worker writes its buffered predictions to the prediction database."
    )
    prediction_log_max_buffer: PositiveInt = Field(
        50_000, description="Most unwritten predictions a worker keeps while the prediction database is unavailable."
    )
    prediction_log_max_buffer_bytes: PositiveInt = Field(
        64 * 2**20,
        description="Most memory, in bytes, a worker's unwritten predictions may take (texts included); beyond "
        "it, or beyond `SENTIMENT_PREDICTION_LOG_MAX_BUFFER` rows, the oldest are dropped and counted.",
    )
    prediction_log_spool_dir: Path | None = Field(
        None,
        description="Folder of the workers' crash-safe copies of their unwritten predictions, which a killed "
        "worker's successor writes to the prediction database; unset: `<state_dir>/prediction-spool`.",
    )
    retention_max_rows: PositiveInt = Field(
        1_000_000,
        description="Most unlabelled predictions kept (labelled ones: `SENTIMENT_RETENTION_MAX_LABELLED_ROWS`).",
    )
    retention_max_age_hours: PositiveFloat = Field(168.0, description="Oldest unlabelled prediction kept.")
    retention_max_labelled_rows: PositiveInt = Field(
        500_000,
        description="Most labelled predictions kept (the retrain's training data): beyond it, the oldest labels "
        "go with their predictions.",
    )
    retention_max_labelled_age_hours: PositiveFloat = Field(
        8760.0, description="Oldest label kept, by when it was received (default: a year)."
    )
    live_accuracy_window: PositiveInt = Field(500, description="Labelled predictions behind `sentiment_live_accuracy`.")
    feedback_token: SecretStr | None = Field(
        None,
        description="Bearer tokens `POST /v1/feedback` accepts: one plain token (named `default`), or one "
        "`name:token` per line or comma; each label records the name of the token that sent it (names: 1-64 of "
        "`A-Za-z0-9._-`, not `anonymous` or `legacy`). Unset: feedback answers 401 (scripts/serve generates a "
        "token file).",
    )
    feedback_token_file: Path | None = Field(None, description="File holding the feedback tokens (same format).")
    allow_unauthenticated_feedback: bool = Field(
        False,
        description="Development only: with no feedback token configured, accept feedback without credentials "
        "(its labels are recorded as sent by `anonymous`).",
    )
    feedback_revocation_refresh_seconds: PositiveFloat = Field(
        5.0,
        description="How often each worker rereads the feedback token names revoked with `python -m app.cli "
        "feedback revoke NAME` from the database: the longest a revoked token is still accepted.",
    )

    # Drift monitor
    drift_window_size: PositiveInt = Field(
        500,
        le=10_000,
        description="Latest predictions of the current version tested against its reference (at most 10,000: the "
        "MMD test holds a (1,000 + window)² float32 kernel matrix, ~0.5 GB at the maximum).",
    )
    drift_check_interval_seconds: PositiveFloat = Field(
        10.0,
        description="Longest time between drift checks while new predictions arrive (unless the minimum gap below "
        "is longer).",
    )
    drift_check_every_predictions: PositiveInt = Field(
        100, description="Also check as soon as this many new predictions arrived, once the minimum gap passed."
    )
    drift_min_check_interval_seconds: float = Field(
        2.0,
        ge=0,
        description="Least time between the starts of two drift checks (a new model version is checked at once). "
        "The default is the cadence 100 new predictions give at 50 req/s; 0: no minimum.",
    )
    drift_max_cpu_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of one core drift checks may use while the host is idle: the next check starts no sooner "
        "than the last one's CPU seconds divided by the share in force after it started (the minimum gap is the "
        "larger of the two rules).",
    )
    drift_busy_cpu_share: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Share of one core drift checks may use while the host's CPUs are saturated (each of those "
        "cycles is one the web workers lose); between idle and saturated the share moves with the square of the "
        "host's idle CPU share (averaged over about 10 s).",
    )
    drift_p_value: float = Field(
        0.05, gt=0, lt=1, description="Family-wise significance of the drift verdict (Bonferroni over the drift tests)."
    )
    drift_permutations: PositiveInt = Field(100, description="Permutations of the MMD test.")
    drift_backend: Literal["alibi-detect", "builtin"] = Field(
        "alibi-detect",
        description="Engine of the MMD drift test: `alibi-detect` (MMDDrift, PyTorch; Business Source License "
        "1.1, production use needs a commercial licence) or `builtin` (the project's numpy implementation of the "
        "same test; imports neither torch nor alibi-detect). See the README's licence section.",
    )
    drift_status_refresh_seconds: PositiveFloat = Field(
        1.0, description="How often each worker refreshes the drift summary it adds to predictions."
    )
    monitor_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the drift monitor's own `/metrics` (every process's metrics in "
        "`PROMETHEUS_MULTIPROC_DIR`), for a monitor run as its own process or pod; unset: none, as under "
        "`app.supervisor`, where the web service's `/metrics` already merges the monitor's.",
    )
    monitor_metrics_host: str = Field(
        "127.0.0.1", description="Address the drift monitor's `/metrics` binds to (0.0.0.0 in containers)."
    )

    # Alert webhooks and retraining
    webhook_token: SecretStr | None = Field(
        None, description="Bearer token alert webhooks must present (scripts/serve generates a token file if unset)."
    )
    webhook_token_file: Path | None = Field(None, description="File holding the webhook bearer token.")
    webhook_basic_username: str | None = Field(None, description="Basic-auth user webhooks may present instead.")
    webhook_basic_password: SecretStr | None = Field(None, description="Basic-auth password for webhooks.")
    grafana_hmac_secret: SecretStr | None = Field(
        None, description="When set, /v1/webhooks/grafana also needs a valid HMAC signature keyed by it."
    )
    grafana_hmac_secret_file: Path | None = Field(None, description="File holding the Grafana HMAC secret.")
    grafana_signature_header: str = Field(
        "X-Grafana-Alerting-Signature", description="Header carrying the hex HMAC-SHA256 signature."
    )
    grafana_timestamp_header: str = Field(
        "X-Grafana-Alerting-Timestamp",
        description="Header with the signing time (Unix seconds): with an HMAC secret, the signature covers "
        "`<timestamp>:<body>` and a timestamp older than the replay window is refused. Empty: the signature "
        "covers the body alone and a captured request can be replayed.",
    )
    grafana_replay_window_seconds: PositiveInt = Field(300, description="Oldest signed timestamp accepted.")
    allow_unauthenticated_webhooks: bool = Field(
        False, description="Development only: accept webhooks without credentials when none are configured."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin endpoints (/v1/retrain*); unset: they answer 401."
    )
    admin_token_file: Path | None = Field(None, description="File holding the admin token.")
    retrain_alert_names: list[str] = Field(
        ["SentimentDriftDetected"], description="Alert names whose firing notifications start a retrain."
    )
    retrain_min_estimated_drop_points: float | None = Field(
        None,
        ge=0,
        le=100,
        description="When set, a firing `SentimentDriftDetected` starts a retrain only if the latest drift check's "
        "estimated accuracy (from confidence, no labels) is at least this many points below the version's reference "
        "estimate; otherwise the webhook answers `skipped_harmless_drift`. A check without an estimate does not hold "
        "a retrain back. Unset (default): drift alone retrains, because the estimate misses a concept shift and "
        "understates real drops (docs/benchmarks.md#estimated-accuracy); 2 is the value to use (no in-domain window "
        "reached it, 94-100 % of shifted ones did).",
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
    retrain_max_source_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Most of the feedback weight the labels of one feedback token may carry when several tokens "
        "sent labels (the others' shares grow to make up the rest); a lone token is not capped.",
    )
    retrain_min_labels: PositiveInt = Field(50, description="Fewest new feedback labels worth a retrain.")
    retrain_shadow_min_rows: PositiveInt = Field(
        100,
        description="Fewest live predictions of the current version (texts the candidate was not fitted on, of "
        "the latest `SENTIMENT_DRIFT_WINDOW_SIZE`) a candidate the gate passed is shadow-scored on; fewer: the "
        "shadow is skipped (recorded, not blocking).",
    )
    retrain_shadow_min_agreement: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Least share of the live window on which the candidate must predict the current model's label; "
        "below it the candidate is rejected (reason `shadow`). Two models at least 75 % accurate agree on at least "
        "half the rows (agreement >= a1 + a2 - 1). 0: never blocks.",
    )
    retrain_shadow_max_estimated_drop: float = Field(
        5.0,
        ge=0,
        le=100,
        description="Most percentage points the candidate's estimated accuracy (mean confidence, "
        "app/monitoring/performance.py) on the live window may lie below the current model's on the same texts; "
        "beyond it the candidate is rejected (reason `shadow`). 100: never blocks.",
    )
    retrain_max_seconds: PositiveFloat = Field(
        1800.0,
        description="Longest a retrain may run: past it, the retrain process records its job as failed "
        "(reason `timeout`) and exits, which frees the retrain lock.",
    )
    retrain_mode: Literal["spawn", "queue"] = Field(
        "spawn",
        description="How a retrain runs: `spawn`, the web worker that accepted the request starts it as its own "
        "child process; `queue`, the web service only records the job as `queued` and a retrain worker "
        "(`python -m app.retrain.worker`, its own process or pod; `app.supervisor` starts one) claims and runs it.",
    )
    retrain_worker_poll_seconds: PositiveFloat = Field(
        2.0, description="How often a retrain worker looks for a queued job (and at the one it runs)."
    )
    retrain_worker_stop_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long a retrain worker waits for the retrain it runs to finish; past it, it "
        "ends the retrain and puts its job back in the queue for the next worker.",
    )
    retrain_worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of a retrain worker's own `/metrics` (every process's metrics in "
        "`PROMETHEUS_MULTIPROC_DIR`: the worker's and its retrains'), for a worker run as its own pod; unset: "
        "none, as under `app.supervisor`, where the web service's `/metrics` already merges them.",
    )
    retrain_worker_metrics_host: str = Field(
        "127.0.0.1", description="Address a retrain worker's `/metrics` binds to (0.0.0.0 in containers)."
    )

    # Promotion watch
    promotion_watch_seconds: float = Field(
        3600.0,
        ge=0,
        description="How long after a retrain's promotion (or `app.cli promote --watch`) the drift monitor compares "
        "the new version with the one it replaced and rolls it back on a significant drop; 0: no watch.",
    )
    promotion_watch_min_labels: PositiveInt = Field(
        100,
        description="Fewest feedback labels on the new version's predictions (and on the replaced version's) before "
        "the watch compares their realised accuracy; it tests again each time the new version's labels double.",
    )
    promotion_watch_p_value: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Significance of the watch's one-sided two-proportion test over the whole watch: the k-th test "
        "(at min-labels x 2^(k-1) labels) runs at this / 2^k, so repeated tests never add up to more.",
    )
    promotion_watch_min_drop: float = Field(
        2.0,
        ge=0,
        le=100,
        description="Least drop in realised accuracy, in percentage points, the watch rolls back for (with a "
        "significant test).",
    )
    promotion_watch_max_estimated_drop: float = Field(
        5.0,
        ge=0,
        le=100,
        description="Most percentage points the new version's estimated accuracy on its latest live window (at "
        "least 100 predictions) may lie below the replaced version's on the same texts; beyond it the watch rolls "
        "back. 100: only realised accuracy rolls back.",
    )

    # Logs
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")


# -- the configuration reference (docs/configuration.md) ------------------------------------------------

REFERENCE_COMMAND = "python -m app.settings > docs/configuration.md"
"""The command that regenerates docs/configuration.md (``scripts/docs`` runs it)."""

_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "secret string",
}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if origin is UnionType:  # ``X | None``: optional, which the "unset" default says
        return " or ".join(_type_text(arg) for arg in args if arg is not type(None))
    if origin is list:
        return f"JSON list of {_type_text(args[0])}s"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _field_type(field: FieldInfo) -> str:
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUNDS if hasattr(m, attr)]
    return ", ".join([_type_text(field.annotation), *bounds])


def _field_default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, Path):  # paths under the repository render relative to it, the same on every machine
        value = f"./{value.relative_to(REPO_ROOT).as_posix()}" if value.is_relative_to(REPO_ROOT) else value
    elif isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, list | dict):
        value = json.dumps(value)
    return f"`{value}`"


def _field_groups() -> list[tuple[str, list[str]]]:
    """The fields in source order, grouped under the ``# Heading`` comments (after a blank line) above them."""
    groups: list[tuple[str, list[str]]] = [("Other", [])]
    previous = ""
    for line in inspect.getsource(Settings).splitlines():
        heading = re.fullmatch(r" {4}# (.+)", line)
        field = re.match(r" {4}(\w+):", line)
        if heading and not previous.strip():
            groups.append((heading.group(1), []))
        elif field and field.group(1) in Settings.model_fields:
            groups[-1][1].append(field.group(1))
        previous = line
    placed = {name for _, names in groups for name in names}
    groups.append(("Other", [name for name in Settings.model_fields if name not in placed]))
    return [(title, names) for title, names in groups if names]


def settings_reference_markdown() -> str:
    """docs/configuration.md: one table row per setting (variable, type, default, description), grouped as
    the fields are grouped in this module. It depends on this module alone, not on the environment."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        "# Configuration",
        "",
        f"<!-- Generated from the field descriptions in app/settings.py by `{REFERENCE_COMMAND}`"
        " (scripts/docs). Do not edit by hand. -->",
        "",
        "Every setting is an environment variable, read alike by the web workers, gunicorn's configuration, the",
        "drift monitor, the CLI and retrain processes (a retrain inherits the service's settings). Paths default",
        "to folders of the repository (`./` is its root). Secrets with a `_FILE` twin can be given as a file.",
    ]
    for title, names in _field_groups():
        lines += ["", f"## {title}", "", "| variable | type | default | description |", "| --- | --- | --- | --- |"]
        for name in names:
            field = Settings.model_fields[name]
            cells = [f"`{prefix}{name.upper()}`", _field_type(field), _field_default(field), field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_reference_markdown(), end="")
