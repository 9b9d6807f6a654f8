"""A real gunicorn outlives a corrupt model pointer: it keeps serving, keeps watching, and follows the fix."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from app.ml.registry import POINTER, ModelRegistry
from tests.integration.services import REPO, Service

pytestmark = pytest.mark.integration


def _served(service: Service) -> set[str]:
    responses = [httpx.post(f"{service.url}/v1/predict", json={"text": "a fine film"}) for _ in range(20)]
    assert {r.status_code for r in responses} == {200}
    return {r.json()["model_version"] for r in responses}


def test_workers_survive_a_corrupt_pointer_and_serve_the_next_promotion(
    service: Service, store: ModelRegistry, versions: list[str]
) -> None:
    pointer = store.root / POINTER
    good = pointer.read_text()
    pointer.write_text("[]")
    time.sleep(2)  # several polls of every worker
    assert _served(service) == {versions[0]}
    assert any(e.get("event") == "model_pointer_unreadable" for e in service.logs())
    pointer.write_text(good)
    cli = [sys.executable, "-m", "app.cli", "--store", str(store.root)]
    subprocess.run([*cli, "promote", versions[1]], cwd=REPO, check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while (seen := _served(service)) != {versions[1]} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen == {versions[1]}
