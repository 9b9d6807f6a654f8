"""Storage fixtures: the repositories over a migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.migrations import upgrade
from app.storage.predictions import PredictionRepository
from app.storage.repositories import Repositories


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Repositories]:
    url = f"sqlite:///{tmp_path / 'sub' / 'log.db'}"
    upgrade(url)
    repositories = Repositories.connect(url)
    yield repositories
    repositories.dispose()


@pytest.fixture
def predictions(storage: Repositories) -> PredictionRepository:
    return storage.predictions
