"""The model store in a database and an object store: versions' rows and the pointer in a real PostgreSQL,
artifacts in a real S3 (SeaweedFS); every instance sees a promotion at once, loads verify what they download."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from structlog.testing import capture_logs

from app.cli import main as cli
from app.errors import (
    ArtifactExistsError,
    ArtifactIntegrityError,
    CurrentVersionChangedError,
    ModelSignatureError,
    ModelStoreError,
)
from app.main import create_app
from app.migrations import upgrade
from app.ml import data as data_module
from app.ml.artifact_store import FileArtifactStore, S3ArtifactStore
from app.ml.data import Corpus
from app.ml.drift_reference import load_reference
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, SIGNATURE, ModelRegistry, ModelVersion
from app.ml.registry_db import DatabaseBackend, open_engine
from app.ml.train import train_and_register
from app.serving.models import ModelManager
from app.settings import Settings
from tests.conftest import SMALL_PARAMS
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures
from tests.s3 import SeaweedS3, s3_prefix, seaweedfs  # noqa: F401  fixtures

pytestmark = pytest.mark.integration

KEY = b"a-signing-key-kept-outside-the-store"
TEXTS = ["a warm, funny and moving film", "a dull, lifeless mess"]


@pytest.fixture
def s3_settings(postgres_url: str, s3_prefix: str, tmp_path: Path) -> Settings:  # noqa: F811
    """A fresh database migrated to head and a fresh S3 prefix: an empty store in both."""
    upgrade(postgres_url)
    return Settings(
        model_store=tmp_path / "unused-folder",
        model_store_url=s3_prefix,
        database_url=postgres_url,
        state_dir=tmp_path / "var",
    )


_opened: list[ModelRegistry] = []


@pytest.fixture(autouse=True)
def _close_instances() -> Iterator[None]:
    """Every instance a test opened closes its connections (before its database is dropped)."""
    yield
    while _opened:
        _opened.pop().close()


def instance(settings: Settings, name: str = "a", key: bytes | None = None) -> ModelRegistry:
    """The registry of one service instance: its own connections and its own download cache."""
    own = settings.model_copy(update={"model_cache_dir": settings.state_dir / f"cache-{name}"})
    registry = ModelRegistry.from_settings(own)
    registry = ModelRegistry(registry.backend, key) if key else registry
    _opened.append(registry)
    return registry


def _copy(source: Path) -> Callable[[Path], None]:
    return lambda path: shutil.copyfile(source, path)


def copy_into(registry: ModelRegistry, source: ModelVersion) -> ModelVersion:
    """Register a folder store's version again (a trained model, without training one)."""
    assert source.path is not None
    card = {k: v for k, v in source.metadata.items() if k not in {"version", "stage", "created_at", "artifacts"}}
    card.pop(SIGNATURE, None)
    return registry.register({name: _copy(source.path / name) for name in source.metadata["artifacts"]}, card)


@pytest.fixture
def two(s3_settings: Settings, store: ModelRegistry) -> tuple[ModelRegistry, list[str]]:
    """The S3 store holding copies of the two folder versions, the first promoted."""
    registry = instance(s3_settings)
    names = [copy_into(registry, v).version for v in store.versions()]
    registry.promote(names[0])
    return registry, names


def test_train_and_register_uploads_then_records_and_loads_verified(
    s3_settings: Settings, small_corpus: Corpus
) -> None:
    """A trained version's artifacts are objects, its row holds their hashes; it loads, predicts and serves
    its drift reference and held-out rows from verified downloads."""
    registry = instance(s3_settings)
    assert isinstance(registry.backend, DatabaseBackend) and registry.root is None
    result = train_and_register(registry, small_corpus, SMALL_PARAMS, progress=False)
    version = result.version.version
    assert result.promoted and registry.current_version() == version
    artifacts = registry.backend.artifacts
    assert artifacts.list_versions() == [version]
    assert [v.version for v in registry.versions()] == [version]
    entry = registry.get(version)
    assert entry.stage == "production" and entry.path is None and entry.location.startswith("s3://")
    assert set(entry.metadata["artifacts"]) >= {MODEL_ARTIFACT, REFERENCE_ARTIFACT, "report/metrics.json"}
    loaded = instance(s3_settings, "b").load(version)
    proba = loaded.model.predict_proba(TEXTS)
    assert proba[0, 1] > 0.5 > proba[1, 1]
    assert loaded.read_json(REFERENCE_ARTIFACT)["texts"]
    assert load_reference(loaded).size > 0


def test_promote_and_rollback_are_seen_by_another_instance_at_once(
    two: tuple[ModelRegistry, list[str]], s3_settings: Settings
) -> None:
    """One transaction moves the pointer and the stages; a second instance reads them on its next call."""
    a, (old, new) = two
    b = instance(s3_settings, "b")
    assert b.current_version() == old
    assert a.promote(new) == old
    assert b.current_version() == new and b.get(new).stage == "production" and b.get(old).stage == "archived"
    assert b.rollback() == old
    assert a.current_version() == old and a.get(new).stage == "archived"
    with pytest.raises(ModelStoreError, match="nothing to roll back to"):
        a.rollback()


def test_a_promotion_expecting_another_current_version_is_refused(two: tuple[ModelRegistry, list[str]]) -> None:
    a, (old, new) = two
    with pytest.raises(CurrentVersionChangedError, match=f"expected {new} to be current"):
        a.promote(new, expected_current=new)
    assert a.current_version() == old and a.get(new).stage == "candidate"
    assert a.promote(new, expected_current=old) == old and a.current_version() == new


def test_an_object_changed_in_the_bucket_is_refused_before_unpickling(
    two: tuple[ModelRegistry, list[str]], s3_settings: Settings
) -> None:
    """The hashes come from the database: bytes replaced in the object store never load or get promoted."""
    a, (old, new) = two
    artifacts = a.backend.artifact_store
    assert isinstance(artifacts, S3ArtifactStore)
    other = artifacts.get_artifact(old, MODEL_ARTIFACT, a.get(old).metadata["artifacts"][MODEL_ARTIFACT])
    artifacts.client.put_object(Bucket=artifacts.bucket, Key=f"{artifacts.prefix}/{new}/{MODEL_ARTIFACT}", Body=other)
    fresh = instance(s3_settings, "fresh")  # nothing cached: it downloads
    with capture_logs() as logs, pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        fresh.load(new)
    assert logs[-1]["event"] == "model_integrity_failed" and logs[-1]["model_version"] == new
    with pytest.raises(ArtifactIntegrityError):
        fresh.promote(new)
    assert fresh.current_version() == old


def test_an_upload_that_fails_records_no_version(s3_settings: Settings, store: ModelRegistry) -> None:
    """Objects first, row second: a version whose objects cannot all be stored never gets a row."""
    registry = instance(s3_settings)
    artifacts = registry.backend.artifact_store
    assert isinstance(artifacts, S3ArtifactStore)
    artifacts.client.put_object(Bucket=artifacts.bucket, Key=f"{artifacts.prefix}/v-taken/{MODEL_ARTIFACT}", Body=b"x")
    source = store.versions()[0]
    assert source.path is not None
    with pytest.raises(ArtifactExistsError):
        registry.register({MODEL_ARTIFACT: _copy(source.path / MODEL_ARTIFACT)}, {"metrics": {}}, version="v-taken")
    assert registry.versions() == [] and registry.current_version() is None


def test_a_keyed_store_signs_rows_and_refuses_other_keys(
    two: tuple[ModelRegistry, list[str]], s3_settings: Settings
) -> None:
    a, (old, _new) = two
    keyed = instance(s3_settings, "keyed", KEY)
    with pytest.raises(ModelSignatureError, match="not signed"):
        keyed.load(old)
    keyed.sign(old)
    assert keyed.load(old).version == old and SIGNATURE in a.get(old).metadata
    with pytest.raises(ModelSignatureError, match="does not verify"):
        instance(s3_settings, "other", b"another key").load(old)


def test_a_model_manager_serves_the_promoted_version_and_follows_promotions(
    two: tuple[ModelRegistry, list[str]], s3_settings: Settings
) -> None:
    a, (old, new) = two
    manager = ModelManager(instance(s3_settings, "worker"), reload_interval=0.1)
    assert manager.sync() and manager.current.version == old
    assert manager.current.predict_proba(TEXTS)[0, 1] > 0.5
    a.promote(new)
    assert manager.sync() and manager.current.version == new
    assert not manager.sync()


def test_the_service_serves_and_lists_the_s3_stores_current_version(
    two: tuple[ModelRegistry, list[str]], s3_settings: Settings
) -> None:
    """The whole app over a store in PostgreSQL and S3: ready on the promoted version, which it predicts with."""
    _a, (old, new) = two
    settings = s3_settings.model_copy(update={"webhook_token": "t", "reload_interval_seconds": 0.1})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {"status": "ready", "model_version": old}
        response = client.post("/v1/predict", json={"text": TEXTS[0]})
        assert response.status_code == 200 and response.headers["X-Model-Version"] == old
        listed = client.get("/v1/models").json()
        assert listed["current"] == old and {v["version"] for v in listed["versions"]} == {old, new}


def test_the_cli_trains_lists_promotes_and_rolls_back_on_s3(
    s3_settings: Settings,
    small_corpus: Corpus,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--store s3://...` with SENTIMENT_DATABASE_URL: the same commands as on a folder."""
    monkeypatch.setattr("app.cli.configure_logging", lambda _level: None)  # its handler would outlive capsys
    monkeypatch.setitem(data_module.CORPORA, "rotten_tomatoes", lambda _data_dir: small_corpus)
    monkeypatch.setenv("SENTIMENT_DATABASE_URL", str(s3_settings.database_url))
    monkeypatch.setenv("SENTIMENT_STATE_DIR", str(s3_settings.state_dir))
    monkeypatch.delenv("SENTIMENT_MODEL_STORE_URL", raising=False)
    store = ["--store", str(s3_settings.model_store_url)]
    assert cli([*store, "train"]) == 0
    assert cli([*store, "train", "--promote", "never", "--C", "2"]) == 0
    out = capsys.readouterr().out
    assert "promoted to current" in out and "not promoted" in out and f"{s3_settings.model_store_url}/v" in out
    registry = instance(s3_settings)
    first, second = (v.version for v in registry.versions())
    assert cli([*store, "list"]) == 0
    assert f"* {first}" in capsys.readouterr().out
    assert cli([*store, "promote", second]) == 0
    assert f"current: {second} (was {first})" in capsys.readouterr().out
    assert registry.current_version() == second
    assert cli([*store, "rollback"]) == 0 and registry.current_version() == first
    assert cli([*store, "show", second]) == 0
    assert '"stage": "archived"' in capsys.readouterr().out
    monkeypatch.setenv("SENTIMENT_MODEL_STORE_URL", str(s3_settings.model_store_url))  # the setting, no --store
    assert cli(["promote", second]) == 0 and registry.current_version() == second
    assert cli(["--store", "gs://bucket/x", "list"]) == 1
    assert "unsupported model store URL" in capsys.readouterr().err


def test_the_database_row_not_the_bucket_names_the_versions(two: tuple[ModelRegistry, list[str]]) -> None:
    """An upload without a row (a crash between the two) is not a version; a row is one."""
    a, (old, new) = two
    artifacts = a.backend.artifact_store
    assert artifacts is not None
    artifacts.put_version("v-orphan", {MODEL_ARTIFACT: b"never recorded"})
    assert [v.version for v in a.versions()] == sorted([old, new])
    backend = a.backend
    assert isinstance(backend, DatabaseBackend)
    engine = create_engine(backend.engine.url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM model_versions")).scalar() == 2
    finally:
        engine.dispose()


def test_on_sqlite_and_a_folder_of_artifacts_the_same_store_works(store: ModelRegistry, tmp_path: Path) -> None:
    """The database backend on the default SQLite database (a change takes its write lock first), with
    file:// artifacts: registration, promotion seen by another instance, rollback, verified loads."""
    url = f"sqlite:///{tmp_path / 'var' / 'predictions.db'}"
    upgrade(url)

    def open_instance() -> ModelRegistry:
        registry = ModelRegistry(DatabaseBackend(open_engine(url), FileArtifactStore(tmp_path / "artifacts")))
        _opened.append(registry)
        return registry

    a, b = open_instance(), open_instance()
    old, new = (copy_into(a, v).version for v in store.versions())
    assert a.promote(old) is None and b.current_version() == old
    assert b.promote(new, expected_current=old) == old and a.current_version() == new
    assert a.rollback() == old and b.get(new).stage == "archived"
    assert b.load(old).read_json(REFERENCE_ARTIFACT)["texts"]
