"""Shared fixtures: real small models trained on real Rotten Tomatoes rows, and clean global state."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from app.migrations import upgrade
from app.ml.data import Corpus, load_rotten_tomatoes
from app.ml.registry import ModelRegistry
from app.ml.train import TrainingResult, train_and_register
from app.settings import Settings

# Small enough to train in about a second, large enough to be a real model (~75 % accuracy).
SMALL_ROWS = 3000
SMALL_PARAMS: dict[str, Any] = {"calibration_folds": 3}
"""Parameters of the default kind that fit fast (3 calibration folds); the others take its defaults."""
WEBHOOK_TOKEN = "test-webhook-token"
ADMIN_TOKEN = "test-admin-token"
FEEDBACK_TOKEN = "test-feedback-token"
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


@pytest.fixture(autouse=True)
def _reset_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from structlog's defaults, whatever an earlier test configured.

    Code under test (the CLI, the monitor) may configure structlog to cache loggers on first use; a
    module logger cached in one test would ignore every later test's configuration (``capture_logs``),
    so within tests that caching is switched off.
    """
    configure = structlog.configure

    def configure_uncached(**kwargs: object) -> None:
        configure(**{**kwargs, "cache_logger_on_first_use": False})  # type: ignore[arg-type]

    monkeypatch.setattr(structlog, "configure", configure_uncached)
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def rotten_tomatoes() -> Corpus:
    return load_rotten_tomatoes()


@pytest.fixture(scope="session")
def small_corpus(rotten_tomatoes: Corpus) -> Corpus:
    """A fixed, stratified-by-chance sample of the real corpus."""
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(len(rotten_tomatoes), SMALL_ROWS, replace=False))
    return rotten_tomatoes.subset(index, "rotten_tomatoes_sample")


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory: pytest.TempPathFactory, small_corpus: Corpus) -> tuple[Path, list[str]]:
    """A store with two trained versions; the first is current. Copied per test, never changed."""
    root = tmp_path_factory.mktemp("store")
    registry = ModelRegistry(root)
    first = train_and_register(registry, small_corpus, SMALL_PARAMS, progress=False)
    second = train_and_register(registry, small_corpus, {**SMALL_PARAMS, "C": 2.0}, promote="never", progress=False)
    return root, [first.version.version, second.version.version]


@pytest.fixture(scope="session")
def full_store(tmp_path_factory: pytest.TempPathFactory, rotten_tomatoes: Corpus) -> tuple[Path, str]:
    """A store whose model is trained on the whole named corpus, as retraining needs (its base data)."""
    root = tmp_path_factory.mktemp("full_store")
    result = train_and_register(ModelRegistry(root), rotten_tomatoes, SMALL_PARAMS, progress=False)
    return root, result.version.version


@pytest.fixture
def store(tmp_path: Path, _session_store: tuple[Path, list[str]]) -> ModelRegistry:
    """A private copy of the two-version store: tests may promote, roll back or tamper with it."""
    root = tmp_path / "model_store"
    shutil.copytree(_session_store[0], root)
    return ModelRegistry(root)


@pytest.fixture
def versions(_session_store: tuple[Path, list[str]]) -> list[str]:
    """Names of the store's versions: [current, candidate]."""
    return list(_session_store[1])


@pytest.fixture
def settings(store: ModelRegistry, tmp_path: Path) -> Settings:
    """The service's settings over the private store, with a private prediction log migrated to head (as
    ``scripts/serve`` does before starting)."""
    settings = Settings(
        model_store=store.root,
        state_dir=tmp_path / "var",
        reload_interval_seconds=0.1,
        prediction_log_flush_seconds=0.05,
        drift_status_refresh_seconds=0.1,
        webhook_token=WEBHOOK_TOKEN,
        admin_token=ADMIN_TOKEN,
        feedback_token=FEEDBACK_TOKEN,
    )
    upgrade(settings.prediction_log_url)
    return settings


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, small_corpus: Corpus) -> TrainingResult:
    """One training run to inspect (its store is private to this fixture)."""
    registry = ModelRegistry(tmp_path_factory.mktemp("trained"))
    return train_and_register(registry, small_corpus, SMALL_PARAMS, progress=False)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def empty_store(tmp_path: Path) -> ModelRegistry:
    root = tmp_path / "empty_store"
    root.mkdir()
    return ModelRegistry(root)
