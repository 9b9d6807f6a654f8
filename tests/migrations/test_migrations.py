"""Schema migrations: empty to head and back on SQLite and PostgreSQL, adoption of older databases, and
the processes that refuse a database whose schema is behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    text,
)
from structlog.testing import capture_logs

from app import migrations
from app.cli import main as cli
from app.main import create_app
from app.migrations import BASELINE, UPGRADE_COMMAND, DatabaseSchemaBehindError, alembic_config, upgrade
from app.ml.registry import ModelRegistry
from app.monitoring.monitor import DriftMonitor
from app.settings import Settings
from app.storage.feedback_sources import FeedbackSourceRepository
from app.storage.repositories import Repositories
from tests.conftest import free_port
from tests.integration.services import start_service
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures
from tests.storage.test_predictions import row


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'var' / 'predictions.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind the service supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'predictions.db'}"
    return str(request.getfixturevalue("postgres_url"))


def assert_schema_matches_the_models(url: str) -> None:
    """`alembic check`: autogenerate finds no difference between the migrated database and the tables'
    MetaData (a column, index, type or nullability in one and not the other fails)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            command.check(alembic_config(connection))
    finally:
        engine.dispose()


REGISTRY_TABLES = {"model_versions", "model_pointer"}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_registry_revision_creates_the_pointer_row_nothing_promoted(url: str) -> None:
    """The model registry's pointer has its one row from the start (promotions lock it), naming no version."""
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, version, history FROM model_pointer")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, None, "[]")]


def columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_an_empty_database_migrates_to_head_and_matches_the_models(url: str) -> None:
    """Every revision runs from nothing, and the result is exactly the schema the code declares."""
    state = upgrade(url)
    assert state.up_to_date and state.current == migrations.head() and not state.legacy
    assert_schema_matches_the_models(url)
    again = upgrade(url)  # a second run (another start) changes nothing
    assert again.current == state.current


def test_the_revision_chain_read_without_alembic_is_alembics_own(url: str) -> None:
    """The start-up check reads the scripts' revisions itself (no Alembic import in the web workers): the same
    history, in the same order, as Alembic's script directory; and the same current revision as Alembic reads."""
    scripts = ScriptDirectory.from_config(alembic_config())
    assert migrations.revisions() == [script.revision for script in reversed(list(scripts.walk_revisions()))]
    assert [migrations.head()] == list(scripts.get_heads())
    assert migrations.current(url).current is None
    upgrade(url, migrations.revisions()[-2])
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert migrations.current_revision(connection) == migrations.revisions()[-2]
            assert MigrationContext.configure(connection).get_current_revision() == migrations.revisions()[-2]
    finally:
        engine.dispose()


def test_a_second_head_or_a_broken_chain_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (versions / "b.py").write_text('revision: str = "b"\ndown_revision: str | None = "a"\n')
    monkeypatch.setattr(migrations, "MIGRATIONS_DIR", tmp_path)
    migrations.revision_chain.cache_clear()
    try:
        assert migrations.revisions() == ["a", "b"]
        (versions / "c.py").write_text('revision = "c"\ndown_revision = "a"\n')
        migrations.revision_chain.cache_clear()
        with pytest.raises(RuntimeError, match="2 heads"):
            migrations.revision_chain()
    finally:
        monkeypatch.undo()
        migrations.revision_chain.cache_clear()


def test_revisions_downgrade_and_upgrade_again_keeping_the_rows(url: str) -> None:
    """Rolling releases back: down to the baseline drops what later revisions added (their data only: the
    label_source column, the model registry's tables), up again restores it."""
    upgrade(url)
    log = Repositories.connect(url)
    log.predictions.insert_predictions([row(1), row(2)])
    log.predictions.set_label("p00001", "positive", source="web")
    log.dispose()
    assert migrations.downgrade(url, BASELINE).current == BASELINE
    assert "label_source" not in columns(url, "predictions") and not tables(url) & REGISTRY_TABLES
    assert upgrade(url).up_to_date
    assert "label_source" in columns(url, "predictions") and tables(url) >= REGISTRY_TABLES
    log = Repositories.connect(url)
    labelled = log.predictions.get_prediction("p00001")
    assert log.predictions.count_predictions() == 2 and labelled is not None and labelled.label == "positive"
    log.dispose()


def test_the_feedback_sources_revision_adds_and_drops_its_table(url: str) -> None:
    """Down one revision drops the purges and revocations (the older release accepts every token); up adds the
    table back, empty."""
    upgrade(url)
    log = Repositories.connect(url)
    FeedbackSourceRepository(log.database).purge("leaked", revoke=True)
    log.dispose()
    assert migrations.downgrade(url, "c41d8e2f9a16").current == "c41d8e2f9a16"
    assert "feedback_sources" not in tables(url)
    assert upgrade(url).up_to_date and columns(url, "feedback_sources") == {"name", "purged_at", "revoked_at"}
    log = Repositories.connect(url)
    assert FeedbackSourceRepository(log.database).revoked() == frozenset()
    log.dispose()


def labelled_index_condition(url: str) -> str | None:
    """The WHERE of ``ix_predictions_labelled_at`` as the database reflects it (None: a full index)."""
    engine = create_engine(url)
    try:
        (index,) = [i for i in inspect(engine).get_indexes("predictions") if i["name"] == "ix_predictions_labelled_at"]
    finally:
        engine.dispose()
    where = next((v for k, v in index.get("dialect_options", {}).items() if k.endswith("_where")), None)
    return None if where is None else str(where)


def test_the_labelled_index_revision_makes_it_partial_and_gives_labels_a_time(url: str) -> None:
    """Up: the index holds the labelled rows only, and a label without a time (the queries know labels by
    their time) takes its prediction's; down: the full index of the release before."""
    upgrade(url)
    assert "labelled_at IS NOT NULL" in (labelled_index_condition(url) or "")
    assert migrations.downgrade(url, "a9e3f27c4d15").current == "a9e3f27c4d15"
    assert labelled_index_condition(url) is None
    log = Repositories.connect(url)
    log.predictions.insert_predictions([row(1), row(2)])
    log.dispose()
    engine = create_engine(url)
    with engine.begin() as connection:  # a hand-made label, with no time
        connection.execute(text("UPDATE predictions SET label = 'positive' WHERE id = 'p00001'"))
    engine.dispose()
    assert upgrade(url).up_to_date
    assert "labelled_at IS NOT NULL" in (labelled_index_condition(url) or "")
    log = Repositories.connect(url)
    assert [(r.id, r.labelled_at) for r in log.predictions.labelled()] == [("p00001", row(1)["created_at"])]
    log.dispose()


def test_every_revision_downgrades_to_an_empty_database(url: str) -> None:
    upgrade(url)
    assert migrations.downgrade(url, "base").current is None
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


# The tables as the last release before migrations (git 086c03e) created them with `create_all`: frozen
# here, as such a database is, whatever the models become.
released = MetaData()
Table(
    "predictions",
    released,
    Column("id", String(32), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("text", Text, nullable=False),
    Column("text_length", Integer, nullable=False),
    Column("sentiment", String(8), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("p_positive", Float, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("label", String(8), nullable=True),
    Column("labelled_at", Float, nullable=True),
    Index("ix_predictions_version_time", "model_version", "created_at"),
    Index("ix_predictions_time", "created_at"),
    Index("ix_predictions_labelled_at", "labelled_at"),
)
Table(
    "drift_checks",
    released,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("checked_at", Float, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("drift", Boolean, nullable=False),
    Column("score", Float, nullable=True),
    Column("p_value", Float, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("window_size", Integer, nullable=False),
    Column("confidence_mean", Float, nullable=True),
    Column("details", Text, nullable=False),
    Index("ix_drift_checks_time", "checked_at"),
)
Table(
    "retrain_jobs",
    released,
    Column("id", String(32), primary_key=True),
    Column("trigger", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("outcome", String(32), nullable=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("candidate_version", String(64), nullable=True),
    Column("details", Text, nullable=False),
    Index("ix_retrain_jobs_started", "started_at"),
)
Table(
    "webhook_alerts",
    released,
    Column("identity", String(255), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("job_id", String(32), nullable=True),
)


def released_database(url: str) -> None:
    """A database as the last release left it: its tables, rows in them, no alembic_version."""
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        released.create_all(engine)
        with engine.begin() as connection:
            connection.execute(released.tables["predictions"].insert(), [{**row(i), "label": None} for i in range(5)])
            connection.execute(released.tables["predictions"].update().values(label="positive", labelled_at=2000.0))
            connection.execute(
                released.tables["webhook_alerts"].insert(),
                [{"identity": "f@t0", "source": "alertmanager", "received_at": 1.0, "job_id": None}],
            )
    finally:
        engine.dispose()


def test_a_database_from_before_migrations_is_adopted_and_keeps_its_rows(url: str) -> None:
    """Tables present, no alembic_version: `db upgrade` stamps the baseline, then upgrades, and says so."""
    released_database(url)
    assert migrations.current(url).legacy and migrations.current(url).behind
    said: list[str] = []
    state = upgrade(url, echo=said.append)
    assert state.up_to_date
    assert said[0].startswith("adopted a database created before migrations") and BASELINE in said[0]
    assert said[1] == f"upgraded from {BASELINE} to {migrations.head()}"
    assert_schema_matches_the_models(url)
    log = Repositories.connect(url)
    assert log.predictions.count_predictions() == 5
    assert [r.label for r in log.predictions.labelled()] == ["positive"] * 5
    assert log.alerts.unseen(["f@t0", "f@t1"]) == ["f@t1"]
    log.dispose()


def test_the_cli_upgrades_reports_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db check` exits 1 while the schema is behind and 0 at head; `db upgrade` says what it did."""
    monkeypatch.setattr("app.cli.configure_logging", lambda _level: None)  # its handler would outlive capsys
    monkeypatch.setenv("SENTIMENT_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SENTIMENT_DATABASE_URL", raising=False)
    released_database(f"sqlite:///{tmp_path / 'var' / 'predictions.db'}")
    assert cli(["db", "check"]) == 1
    assert f"run `{UPGRADE_COMMAND}`" in capsys.readouterr().out
    assert cli(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    assert "adopted a database created before migrations" in out and f"at head {migrations.head()}" in out
    assert cli(["db", "check"]) == 0
    assert cli(["db", "current"]) == 0
    assert f"current   {migrations.head()}" in capsys.readouterr().out


# -- processes that refuse an old schema ---------------------------------------------------------------


def behind_events(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "database_schema_behind"]


def test_the_service_refuses_to_start_on_a_schema_behind_and_says_what_to_run(settings: Settings) -> None:
    """A reachable database one revision behind fails the lifespan, with both revisions and the command."""
    previous = migrations.revisions()[-2]
    migrations.downgrade(settings.prediction_log_url, "-1")
    with capture_logs() as logs, pytest.raises(DatabaseSchemaBehindError), TestClient(create_app(settings)):
        pass
    [event] = behind_events(logs)
    assert event["current"] == previous and event["head"] == migrations.head()
    assert event["command"] == UPGRADE_COMMAND and event["process"] == "web"


def test_the_service_refuses_an_empty_database(store: ModelRegistry, tmp_path: Path) -> None:
    """No tables at all (nobody ran `db upgrade`): refused too, nothing created."""
    settings = Settings(model_store=store.root, state_dir=tmp_path / "var", webhook_token="t")
    with capture_logs() as logs, pytest.raises(DatabaseSchemaBehindError), TestClient(create_app(settings)):
        pass
    assert behind_events(logs)[0]["current"] is None
    assert columns_absent(settings.prediction_log_url)


def columns_absent(url: str) -> bool:
    engine = create_engine(url)
    try:
        return inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_an_unreachable_database_at_start_does_not_stop_the_service(store: ModelRegistry, tmp_path: Path) -> None:
    """As before migrations: nothing answers on the database's port, the service serves and logs it."""
    settings = Settings(
        model_store=store.root,
        state_dir=tmp_path / "var",
        webhook_token="t",
        database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none",
    )
    with capture_logs() as logs, TestClient(create_app(settings)) as client:
        assert client.post("/v1/predict", json={"text": "a fine film"}).status_code == 200
    assert [e for e in logs if e["event"] == "prediction_log_unavailable"]
    assert not behind_events(logs)


def test_the_drift_monitor_refuses_a_schema_behind(settings: Settings) -> None:
    migrations.downgrade(settings.prediction_log_url, "-1")
    with capture_logs() as logs, pytest.raises(DatabaseSchemaBehindError):
        DriftMonitor(settings)
    assert behind_events(logs)[0]["process"] == "monitor"


@pytest.fixture
def behind_service_log(store: ModelRegistry, tmp_path: Path) -> Iterator[str]:
    """What a real gunicorn logged when it refused to start on a database a revision behind."""
    state_dir = tmp_path / "var"
    upgrade(f"sqlite:///{state_dir / 'predictions.db'}", migrations.revisions()[-2])
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        start_service(
            store, tmp_path / "gunicorn.log", workers=1, upgrade_database=False, SENTIMENT_STATE_DIR=str(state_dir)
        )
    yield (tmp_path / "gunicorn.log").read_text()


@pytest.mark.integration
def test_real_gunicorn_refuses_to_boot_on_a_schema_behind(behind_service_log: str) -> None:
    """gunicorn exits (its worker failed to boot) and the log names the revisions and the command."""
    assert '"event": "database_schema_behind"' in behind_service_log
    assert UPGRADE_COMMAND in behind_service_log and migrations.head() in behind_service_log
