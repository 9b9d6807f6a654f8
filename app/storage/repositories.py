"""Every repository of the service's database over one shared :class:`~app.storage.database.Database`."""

from __future__ import annotations

from dataclasses import dataclass

from app.settings import Settings
from app.storage.alerts import AlertRepository
from app.storage.database import Database
from app.storage.drift_checks import DriftCheckRepository
from app.storage.model_events import ModelEventRepository
from app.storage.predictions import PredictionRepository
from app.storage.retrain_jobs import RetrainJobRepository


@dataclass(frozen=True)
class Repositories:
    """The database and its five repositories: what the web service (and tests) read and write.

    Processes that need one or two of them (the drift monitor, a retrain) build those on a
    :class:`Database` of their own.
    """

    database: Database
    predictions: PredictionRepository
    drift_checks: DriftCheckRepository
    jobs: RetrainJobRepository
    alerts: AlertRepository
    events: ModelEventRepository  # the model versions' audit trail

    @classmethod
    def of(cls, database: Database) -> Repositories:
        return cls(
            database,
            PredictionRepository(database),
            DriftCheckRepository(database),
            RetrainJobRepository(database),
            AlertRepository(database),
            ModelEventRepository(database),
        )

    @classmethod
    def connect(cls, url: str, *, connect_timeout: float = 3.0, statement_timeout: float = 5.0) -> Repositories:
        return cls.of(Database(url, connect_timeout=connect_timeout, statement_timeout=statement_timeout))

    @classmethod
    def from_settings(cls, settings: Settings) -> Repositories:
        return cls.of(Database.from_settings(settings))

    def dispose(self) -> None:
        self.database.dispose()
