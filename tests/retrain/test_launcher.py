"""What a retrain process is given: the settings it needs, never a credential of the HTTP side."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from app.migrations import upgrade
from app.retrain import launcher as launcher_module
from app.retrain.launcher import RetrainLauncher, job_environment
from app.settings import Settings
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJobRepository

SECRETS = {
    "webhook_token": "s-webhook-token",
    "webhook_basic_password": "s-basic-password",
    "grafana_hmac_secret": "s-grafana-hmac",
    "admin_token": "s-admin-token",
}


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        model_store=tmp_path / "store",
        state_dir=tmp_path / "var",
        model_signing_key="s-signing-key",  # the job signs the versions it registers: it keeps this one
        webhook_basic_username="grafana",
        **SECRETS,
    )


class _Recorded:
    """Stands in for the retrain process: records what ``Popen`` was given, exits 0 at once."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.calls.append({"args": args, **kwargs})
        self.pid = 4242

    def wait(self) -> int:
        return 0


def test_job_environment_keeps_what_a_retrain_reads_and_drops_every_other_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PATH and PROMETHEUS_MULTIPROC_DIR pass; the store, database, data and retrain_* settings pass; every
    webhook, Grafana and admin secret, whether a setting or inherited from the worker's environment, does not."""
    settings = _settings(tmp_path)
    inherited = {
        "PATH": "/usr/bin",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/metrics",
        "SENTIMENT_WEBHOOK_TOKEN": "s-inherited-webhook",
        "SENTIMENT_ADMIN_TOKEN_FILE": "/run/secrets/admin",
    }
    env = job_environment(settings.as_env(), inherited)

    assert env["PATH"] == "/usr/bin" and env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    assert env["SENTIMENT_MODEL_STORE"] == str(settings.model_store)
    assert env["SENTIMENT_MODEL_SIGNING_KEY"] == "s-signing-key"
    assert {"SENTIMENT_DATA_DIR", "SENTIMENT_STATE_DIR", "SENTIMENT_RETRAIN_MIN_LABELS", "SENTIMENT_LOG_LEVEL"} <= set(
        env
    )
    leaked = [name for name, value in env.items() if value in {*SECRETS.values(), "s-inherited-webhook"}]
    assert leaked == []
    assert not [n for n in env if n.startswith(("SENTIMENT_WEBHOOK", "SENTIMENT_GRAFANA", "SENTIMENT_ADMIN"))]
    # What the job reads comes back from its environment as the service configured it.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child.model_store == settings.model_store and child.secret("admin_token") is None


def test_a_started_retrain_process_gets_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment ``RetrainLauncher.start`` hands the process holds none of the service's secrets, even
    those the worker itself inherited."""
    settings = _settings(tmp_path)
    monkeypatch.setenv("SENTIMENT_GRAFANA_HMAC_SECRET", "s-inherited-hmac")
    launcher_module.idle_priority()  # cached: probes chrt with the real Popen before it is replaced
    monkeypatch.setattr(launcher_module.subprocess, "Popen", _Recorded)
    _Recorded.calls = []
    database = Database(settings.prediction_log_url)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.prediction_log_url)
    try:
        jobs = RetrainJobRepository(database)
        launch = RetrainLauncher(settings.model_store, jobs, 0.0, settings.as_env()).start("manual", "test")
    finally:
        database.dispose()

    assert launch.action == "retrain_started"
    (call,) = _Recorded.calls
    env: dict[str, str] = call["env"]
    assert env["SENTIMENT_MODEL_STORE"] == str(settings.model_store) and "PATH" in env
    secrets = {*SECRETS.values(), "s-inherited-hmac"}
    assert [name for name, value in env.items() if value in secrets] == []
    assert subprocess.list2cmdline(call["args"]).endswith(f"{launch.job_id} --trigger manual")
