"""The model store in the service's database and an object store: versions' rows and the current pointer in
SQL, artifacts in an :class:`~app.ml.artifact_store.ArtifactStore`.

Chosen by ``SENTIMENT_MODEL_STORE_URL=s3://bucket/prefix`` (:data:`app.ml.registry.BACKENDS`); the database is
the prediction log's (``SENTIMENT_DATABASE_URL``), its tables created by the migrations (``db upgrade``).

- ``model_versions``: one row per version (name, stage, created_at, metadata JSON with the artifacts' sha256
  sums and the signature). ``register`` uploads every artifact first (:meth:`ArtifactStore.put_version`
  returns once the whole version is stored and marked complete), then inserts the row: the row is what makes
  a version exist, so no row ever names a partial upload (an upload whose row was never written is garbage).
- ``model_pointer``: one row (``id`` 1): the current version and the earlier ones (JSON, newest last). A
  promotion, rollback or signing is one transaction that first locks that row (``SELECT ... FOR UPDATE`` on
  PostgreSQL; on SQLite, a write that takes the database's write lock), so it is serialised with every other
  instance's, and every instance sees the new pointer on its next poll.
- Loads read the hashes from the row, never from the object store: whoever can write the bucket but not the
  database (nor the signing key) cannot make a worker load a model. Downloads are verified and cached by hash.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Float, ForeignKey, Integer, String, Table, Text, create_engine, insert, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.errors import ArtifactIntegrityError, ModelStoreError, VersionNotFoundError
from app.migrations import UPGRADE_COMMAND
from app.ml.artifact_store import artifact_store_from_settings
from app.ml.registry import (
    ArtifactWriter,
    ModelVersion,
    Pointer,
    RegistryBackend,
    RegistryChange,
    parse_pointer,
    verbatim_card,
)
from app.storage.database import CONNECT_ARGS, metadata

if TYPE_CHECKING:
    from app.ml.artifact_store import ArtifactStore
    from app.settings import Settings

POINTER_ID = 1
"""The id of the pointer's one row (inserted by the migration that creates the table)."""

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("stage", String(16), nullable=False),
    Column("metadata", Text, nullable=False),  # JSON: the model card, artifacts' sha256, signature; not stage
)

model_pointer = Table(
    "model_pointer",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", String(64), ForeignKey("model_versions.version"), nullable=True),  # None: none promoted
    Column("history", Text, nullable=False),  # JSON list of earlier current versions, newest last
    Column("updated_at", Float, nullable=False),
)


@contextlib.contextmanager
def _database_errors(action: str) -> Iterator[None]:
    """SQLAlchemy's errors as :class:`ModelStoreError` (callers such as the model watcher handle those)."""
    try:
        yield
    except SQLAlchemyError as exc:
        said = str(getattr(exc, "orig", None) or exc).strip()
        reason = said.splitlines()[0] if said else ""
        raise ModelStoreError(
            f"model store database: {action} failed ({type(exc).__name__}: {reason}); "
            f"is its schema current (`{UPGRADE_COMMAND}`)?",
            details={"action": action, "error": type(exc).__name__},
        ) from exc


def _entry(row: Any, location: str) -> ModelVersion:
    try:
        card = json.loads(row.metadata)
    except ValueError as exc:
        raise ModelStoreError(f"metadata of {row.version!r} is unreadable: {exc}") from exc
    return ModelVersion(row.version, None, {**card, "stage": row.stage}, f"{location}/{row.version}")


def _pointer(row: Any) -> Pointer:
    if row is None:
        return Pointer(None, [])
    try:
        history = json.loads(row.history)
    except ValueError as exc:
        raise ModelStoreError(f"the current pointer's history is unreadable: {exc}") from exc
    return parse_pointer({"version": row.version, "history": history}, "the current pointer")


def open_engine(url: str, connect_timeout: float = 3.0, statement_timeout: float = 5.0) -> Engine:
    """An engine for the registry's tables, with the driver timeouts :class:`app.storage.database.Database` uses."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = CONNECT_ARGS.get(backend)
    # A few connections: the watcher's poll, a load, a CLI command. Pooled ones are tested before use.
    pooling: dict[str, Any] = (
        {} if backend == "sqlite" else {"pool_pre_ping": True, "pool_timeout": connect_timeout, "pool_size": 2}
    )
    return create_engine(
        url, connect_args=connect_args(connect_timeout, statement_timeout) if connect_args else {}, **pooling
    )


class DatabaseBackend(RegistryBackend):
    """Versions' rows and the current pointer in SQL (``engine``), their artifacts in ``artifacts``."""

    kind = "database"

    def __init__(self, engine: Engine, artifacts: ArtifactStore) -> None:
        self.engine = engine
        self.artifacts = artifacts

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseBackend:
        """The prediction log's database (``SENTIMENT_DATABASE_URL``) and ``SENTIMENT_MODEL_STORE_URL``'s store."""
        engine = open_engine(
            settings.prediction_log_url,
            settings.database_connect_timeout_seconds,
            settings.database_statement_timeout_seconds,
        )
        return cls(engine, artifact_store_from_settings(settings))

    @property
    def location(self) -> str:
        return f"{self.artifacts.url} (versions in {self.engine.url.render_as_string(hide_password=True)})"

    @property
    def artifact_store(self) -> ArtifactStore:
        return self.artifacts

    def close(self) -> None:
        self.engine.dispose()

    # -- reading -----------------------------------------------------------------------------------
    def _get(self, connection: Connection, version: str) -> ModelVersion:
        row = connection.execute(select(model_versions).where(model_versions.c.version == version)).first()
        if row is None:
            raise VersionNotFoundError(f"no model version {version!r}", details={"version": version})
        return _entry(row, self.artifacts.url)

    def get(self, version: str) -> ModelVersion:
        with _database_errors("reading a version"), self.engine.connect() as connection:
            return self._get(connection, version)

    def versions(self) -> list[ModelVersion]:
        with _database_errors("listing versions"), self.engine.connect() as connection:
            rows = connection.execute(select(model_versions).order_by(model_versions.c.version)).all()
        found = []
        for row in rows:
            with contextlib.suppress(ModelStoreError):
                found.append(_entry(row, self.artifacts.url))
        return found

    def pointer(self) -> Pointer:
        with _database_errors("reading the current pointer"), self.engine.connect() as connection:
            row = connection.execute(select(model_pointer).where(model_pointer.c.id == POINTER_ID)).first()
        return _pointer(row)

    def is_registered(self, version: str) -> bool:
        query = select(model_versions.c.version).where(model_versions.c.version == version)
        with _database_errors("reading a version"), self.engine.connect() as connection:
            return connection.execute(query).first() is not None

    # -- writing -----------------------------------------------------------------------------------
    def create(
        self, version: str, artifacts: Mapping[str, ArtifactWriter], record: Callable[[dict[str, str]], dict[str, Any]]
    ) -> ModelVersion:
        """Write the artifacts to a temporary folder, upload them all (:meth:`ArtifactStore.put_version`),
        then insert the version's row; a name already registered (or uploaded) is refused."""
        if self.is_registered(version):
            raise ModelStoreError(f"version {version} exists; versions are immutable", details={"version": version})
        with tempfile.TemporaryDirectory(prefix=f"sentiment-{version}-") as folder:
            files: dict[str, Path | bytes] = {}
            for name, write in artifacts.items():
                target = Path(folder) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                files[name] = target
            hashes = self.artifacts.put_version(version, files)
        card = record(hashes)
        self._insert(version, card, time.time())
        return ModelVersion(version, None, card, f"{self.artifacts.url}/{version}")

    def import_version(self, metadata: Mapping[str, Any], artifacts: Mapping[str, bytes]) -> ModelVersion:
        """Upload the artifacts (keeping those an interrupted copy of this version already stored with the same
        bytes), then insert the row with ``metadata`` verbatim, its ``created_at`` the card's."""
        version = str(metadata["version"])
        if self.is_registered(version):
            raise ModelStoreError(f"version {version} exists; versions are immutable", details={"version": version})
        hashes = self.artifacts.put_version(version, dict(artifacts), keep_identical=True)
        card = verbatim_card(metadata, hashes)
        self._insert(version, card, _timestamp(card.get("created_at")))
        return ModelVersion(version, None, card, f"{self.artifacts.url}/{version}")

    def _insert(self, version: str, card: Mapping[str, Any], created_at: float) -> None:
        """Insert a version's row: what makes it exist."""
        row = {
            "version": version,
            "created_at": created_at,
            "stage": str(card.get("stage", "candidate")),
            "metadata": _card_json(card),
        }
        try:
            with _database_errors("registering a version"), self.engine.begin() as connection:
                connection.execute(insert(model_versions).values(**row))
        except ModelStoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise ModelStoreError(f"version {version} exists; versions are immutable") from exc
            raise

    @contextlib.contextmanager
    def change(self) -> Iterator[RegistryChange]:
        with _database_errors("changing the current pointer or a stage"), self.engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # No row locks: a first write takes the database's write lock (others wait busy_timeout), so
                # a change never reads a pointer another one is about to replace.
                connection.execute(
                    update(model_pointer)
                    .where(model_pointer.c.id == POINTER_ID)
                    .values(updated_at=model_pointer.c.updated_at)
                )
            query = select(model_pointer).where(model_pointer.c.id == POINTER_ID).with_for_update()
            row = connection.execute(query).first()
            if row is None:  # a database whose pointer row was deleted: start afresh
                connection.execute(
                    insert(model_pointer).values(id=POINTER_ID, version=None, history="[]", updated_at=time.time())
                )
            yield _DatabaseChange(self, connection, _pointer(row))

    # -- artifacts ---------------------------------------------------------------------------------
    def read_artifact(self, entry: ModelVersion, name: str, hashes: Mapping[str, str]) -> bytes:
        if name not in hashes:
            raise ArtifactIntegrityError(
                f"{entry.version}: {name} is not a recorded artifact", details={"artifact": name}
            )
        return self.artifacts.get_artifact(entry.version, name, str(hashes[name]))


def _timestamp(created_at: Any) -> float:
    """A card's ``created_at`` (ISO 8601) as Unix time; now if it has none."""
    try:
        return datetime.fromisoformat(str(created_at)).timestamp()
    except ValueError:
        return time.time()


def _card_json(card: Mapping[str, Any]) -> str:
    """A version's metadata as stored: everything but ``stage``, which has its own column."""
    return json.dumps({k: v for k, v in card.items() if k != "stage"}, sort_keys=True)


class _DatabaseChange(RegistryChange):
    """Reads and writes in the transaction that holds the pointer row's lock."""

    def __init__(self, backend: DatabaseBackend, connection: Connection, pointer: Pointer) -> None:
        self._backend = backend
        self._connection = connection
        self._pointer = pointer

    def get(self, version: str) -> ModelVersion:
        return self._backend._get(self._connection, version)

    def pointer(self) -> Pointer:
        return self._pointer

    def set_pointer(self, pointer: Pointer) -> None:
        self._connection.execute(
            update(model_pointer)
            .where(model_pointer.c.id == POINTER_ID)
            .values(version=pointer.version, history=json.dumps(pointer.history), updated_at=time.time())
        )
        self._pointer = pointer

    def set_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        self._connection.execute(
            update(model_versions)
            .where(model_versions.c.version == version)
            .values(stage=str(metadata.get("stage", "candidate")), metadata=_card_json(metadata))
        )
