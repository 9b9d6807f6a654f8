"""Integration fixtures: a real gunicorn over a private copy of the trained store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ml.registry import ModelRegistry
from tests.integration.services import Service, start_service


@pytest.fixture
def service(store: ModelRegistry, tmp_path: Path) -> Iterator[Service]:
    running = start_service(store, tmp_path / "gunicorn.log")
    yield running
    running.stop()
