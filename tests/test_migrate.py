"""``python -m app.cli migrate``: a one-machine install (SQLite + a folder store) copied into a real PostgreSQL
and a real S3 (SeaweedFS): the same versions, hashes, pointer and rows, verified, idempotent, and refused
for a tampered artifact."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from app.cli import main as cli
from app.migrations import upgrade
from app.ml.registry import MODEL_ARTIFACT, REFERENCE_ARTIFACT, ModelRegistry
from app.ml.registry_db import model_pointer, model_versions
from app.monitoring.log_copy import TABLES
from app.settings import Settings
from app.storage.database import metadata
from app.storage.drift_checks import DriftCheck
from app.storage.repositories import Repositories
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures
from tests.s3 import SeaweedS3, s3_prefix, seaweedfs  # noqa: F401  fixtures
from tests.storage.test_predictions import row

pytestmark = pytest.mark.integration

TEXTS = ["a warm, funny and moving film", "a dull, lifeless mess", "it was fine, i guess"]
PREDICTIONS = 450  # with --batch-rows 100: several batches and a partial last one


@dataclass
class Install:
    """A one-machine install: the prediction database's URL and the folder store."""

    database_url: str
    store: ModelRegistry
    settings: Settings


@pytest.fixture
def one_machine(store: ModelRegistry, tmp_path: Path) -> Iterator[Install]:
    """The two-version folder store (the second promoted over the first: a history) and a SQLite log with
    predictions, labels from two token names, drift checks, retrain jobs and the alert firings they claimed."""
    versions = [v.version for v in store.versions()]
    store.promote(versions[1])
    settings = Settings(model_store=store.root, state_dir=tmp_path / "var")
    url = settings.prediction_log_url
    upgrade(url)
    log = Repositories.connect(url)
    try:
        log.predictions.insert_predictions(
            [row(i, versions[i % 2], sentiment=("positive", "negative")[i % 3 == 0]) for i in range(PREDICTIONS)]
        )
        for i in range(0, 60, 3):
            log.predictions.set_label(f"p{i:05d}", "negative", now=5000.0 + i, source="web" if i % 2 else "vendor")
        for i in range(5):
            log.drift_checks.insert(
                DriftCheck(
                    checked_at=10.0 + i,
                    model_version=versions[1],
                    status="no_drift",
                    drift=i == 4,
                    score=0.01 * i,
                    window_size=500,
                    details={"i": i},
                )
            )
        log.jobs.create_job("job-1", "alertmanager", "drift", now=100.0, alerts=["fp1@t1"])
        log.jobs.finish_job(
            "job-1", "succeeded", "promoted", {"gate": {"ok": True}}, candidate_version=versions[1], now=160.0
        )
        log.jobs.create_job("job-2", "manual", "operator", now=9000.0, alerts=["fp2@t2"])
        log.jobs.finish_job("job-2", "failed", "failed", {"reason": "timeout"}, now=9100.0)
    finally:
        log.dispose()
    yield Install(url, store, settings)


@pytest.fixture
def target(postgres_url: str, s3_prefix: str, tmp_path: Path) -> Settings:  # noqa: F811
    """An empty PostgreSQL database (not even migrated: migrate does it) and an empty S3 prefix."""
    return Settings(
        model_store=tmp_path / "unused",
        model_store_url=s3_prefix,
        database_url=postgres_url,
        state_dir=tmp_path / "target-var",
    )


def migrate(install: Install, target: Settings, *extra: str) -> int:
    assert target.database_url and target.model_store_url
    argv = ["--store", str(install.store.root), "migrate", "--from-database", install.database_url]
    argv += ["--to-database", target.database_url, "--to-store", target.model_store_url, "--batch-rows", "100"]
    return cli([*argv, *extra])


def rows(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return {
                table.name: [dict(r) for r in connection.execute(select(table).order_by(*table.primary_key)).mappings()]
                for table in TABLES
            }
    finally:
        engine.dispose()


@pytest.fixture
def opened() -> Iterator[list[ModelRegistry]]:
    registries: list[ModelRegistry] = []
    yield registries
    for registry in registries:
        registry.close()


def target_registry(target: Settings, opened: list[ModelRegistry], name: str = "check") -> ModelRegistry:
    registry = ModelRegistry.from_settings(target.model_copy(update={"model_cache_dir": target.state_dir / name}))
    opened.append(registry)
    return registry


def test_tables_copied_are_every_table_but_the_registrys() -> None:
    """A new table in the prediction database must be added to the copy (or this fails)."""
    assert {t.name for t in TABLES} == set(metadata.tables) - {model_versions.name, model_pointer.name}


def test_migrate_copies_versions_pointer_and_rows_and_a_second_run_copies_nothing(
    one_machine: Install, target: Settings, opened: list[ModelRegistry], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every version arrives with identical metadata (created_at, stage, hashes), the same current version and
    history, loads and predicts identically; every row of every table is equal; running again adds nothing."""
    source = one_machine.store
    assert migrate(one_machine, target) == 0
    out = capsys.readouterr().out
    assert "versions  2 copied, 0 already present, 0 failed" in out and "pointer   copied" in out
    assert f"predictions: {PREDICTIONS} rows: {PREDICTIONS} copied, 0 already present" in out

    moved = target_registry(target, opened)
    assert [v.version for v in moved.versions()] == [v.version for v in source.versions()]
    for entry in source.versions():
        copy = moved.get(entry.version)
        assert copy.metadata == entry.metadata  # verbatim: stage, created_at, artifacts' sha256, signature
        assert copy.location.startswith("s3://")
        assert set(copy.metadata["artifacts"]) >= {MODEL_ARTIFACT, REFERENCE_ARTIFACT}
        before, after = source.load(entry.version), moved.load(entry.version)
        assert (before.model.predict_proba(TEXTS) == after.model.predict_proba(TEXTS)).all()
        assert after.read_json(REFERENCE_ARTIFACT) == before.read_json(REFERENCE_ARTIFACT)
    assert moved.current_version() == source.current_version()
    assert moved.backend.pointer() == source.backend.pointer() and moved.backend.pointer().history

    before, after = rows(one_machine.database_url), rows(str(target.database_url))
    assert {name: len(r) for name, r in after.items()} == {name: len(r) for name, r in before.items()}
    assert after == before  # every row, labels and label sources included
    assert sum(1 for r in after["predictions"] if r["label_source"] == "web") == 10

    # The service's own code works against the copy: its next drift check gets a fresh id.
    log = Repositories.connect(str(target.database_url))
    try:
        log.drift_checks.insert(
            DriftCheck(
                checked_at=99.0,
                model_version="v",
                status="no_drift",
                drift=False,
                window_size=1,
                details={},
            )
        )
        assert log.predictions.count_predictions() == PREDICTIONS
    finally:
        log.dispose()

    assert migrate(one_machine, target) == 0
    out = capsys.readouterr().out
    assert "versions  0 copied, 2 already present, 0 failed" in out and "pointer   unchanged" in out
    assert f"predictions: {PREDICTIONS} rows: 0 copied, {PREDICTIONS} already present" in out
    assert rows(str(target.database_url))["predictions"] == before["predictions"]
    assert moved.rollback() == source.backend.pointer().history[-1]  # the copied history is usable


def test_a_copy_interrupted_mid_upload_completes_when_run_again(
    one_machine: Install,
    target: Settings,
    seaweedfs: SeaweedS3,  # noqa: F811
    opened: list[ModelRegistry],
) -> None:
    """Objects an interrupted run uploaded (no completion marker, no row) are kept when identical, and the
    version is registered; the store's objects are never overwritten."""
    entry = one_machine.store.versions()[0]
    assert entry.path is not None and target.model_store_url is not None
    prefix = target.model_store_url.removeprefix(f"s3://{seaweedfs.bucket}/")
    data = (entry.path / MODEL_ARTIFACT).read_bytes()
    seaweedfs.client().put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{entry.version}/{MODEL_ARTIFACT}", Body=data)

    assert migrate(one_machine, target) == 0
    moved = target_registry(target, opened)
    assert moved.get(entry.version).metadata == entry.metadata
    assert moved.load(entry.version).model.predict_proba(TEXTS).shape == (3, 2)


def test_a_tampered_artifact_fails_the_copy_of_its_version_alone(
    one_machine: Install, target: Settings, opened: list[ModelRegistry], capsys: pytest.CaptureFixture[str]
) -> None:
    """A source artifact whose bytes differ from its recorded sha256: exit 1 naming the version and artifact,
    no row for that version in the target, the other version and the rows copied; the pointer, which names
    the tampered version, is not copied."""
    old, new = (v.version for v in one_machine.store.versions())
    assert one_machine.store.root is not None
    artifact = one_machine.store.root / old / REFERENCE_ARTIFACT
    artifact.chmod(0o644)
    artifact.write_text(artifact.read_text().replace("a", "e", 1))

    assert migrate(one_machine, target) == 1
    captured = capsys.readouterr()
    assert f"error: {old} not copied: {old}: artifact {REFERENCE_ARTIFACT} sha256 mismatch" in captured.err
    assert f"not copied: it names {old}, which failed" in captured.out
    moved = target_registry(target, opened)
    assert not moved.backend.is_registered(old) and moved.backend.is_registered(new)
    assert moved.current_version() is None
    assert len(rows(str(target.database_url))["predictions"]) == PREDICTIONS


def test_a_source_database_behind_head_is_refused_and_left_alone(
    one_machine: Install, target: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate never changes the source: one behind this release's schema is refused with the command to run."""
    behind = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(behind, "fd3ab7b49a99")
    install = Install(behind, one_machine.store, one_machine.settings)
    assert migrate(install, target) == 1
    assert "the source database is at fd3ab7b49a99, behind head" in capsys.readouterr().err
    engine = create_engine(behind, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "fd3ab7b49a99"
            assert connection.execute(select(func.count()).select_from(TABLES[0])).scalar() == 0
    finally:
        engine.dispose()
