"""Web workers need only read access to the model store: a real gunicorn that cannot write the store serves
predictions, ``/v1/models*`` and ``/metrics``, follows a version another process promotes, and changes nothing
in the store (no file or folder created, removed or modified)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.ml.registry import ModelRegistry
from app.retrain.lock import LOCK_FILE
from tests.integration.services import (
    REPO,
    Service,
    file_modes_enforced,
    overrides_file_modes,
    start_service,
    wait_for,
)

pytestmark = pytest.mark.integration

Listing = dict[str, tuple[int, int, int, int]]


def _listing(root: Path) -> Listing:
    """Every file and folder under ``root``: (inode, size, mtime in ns, mode). A folder's mtime changes with
    any entry created or removed in it, a temporary file included."""
    found: Listing = {}
    for folder, _, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / name for name in files)]:
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)
    return found


def _read_only(root: Path) -> Listing:
    """Folders r-x, files r--, for everyone (the owner included); the store's listing afterwards."""
    for folder, _, files in os.walk(root):
        Path(folder).chmod(0o555)
        for name in files:
            (Path(folder) / name).chmod(0o444)
    return _listing(root)


@pytest.fixture
def read_only_service(store: ModelRegistry, tmp_path: Path) -> Iterator[Service]:
    """gunicorn (spawn mode, SQLite) over a store it cannot write, which has a retrain lock file (as a store
    that has seen retrains has)."""
    prefix = file_modes_enforced()
    if prefix is None:
        pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here: file modes bind no one")
    (store.root / LOCK_FILE).touch()
    _read_only(store.root)
    running = start_service(store, tmp_path / "gunicorn.log", command_prefix=prefix)
    yield running
    running.stop()
    for folder, _, _ in os.walk(store.root):
        Path(folder).chmod(0o755)  # pytest must be able to remove the store


def _serve(service: Service, version: str) -> None:
    """Predictions, every /v1/models route and a /metrics scrape (which probes the retrain lock), all 200."""
    for text in ("a fine film", "dull and far too long", "I loved every minute"):
        response = httpx.post(f"{service.url}/v1/predict", json={"text": text})
        assert response.status_code == 200 and response.json()["model_version"] == version, response.text
    for path in ("/v1/models", f"/v1/models/{version}", f"/v1/models/{version}/events", "/readyz"):
        assert httpx.get(f"{service.url}{path}").status_code == 200, path
    metrics = httpx.get(f"{service.url}/metrics")
    assert metrics.status_code == 200
    assert "sentiment_retrain_in_progress 0.0" in metrics.text  # the lock file was read, without write access


def _swapped_to(service: Service, version: str) -> set[int]:
    """Pids of the workers that logged loading ``version``."""
    return {
        int(str(e["pid"]))
        for e in service.logs()
        if e.get("event") == "model_swapped" and e["model_version"] == version
    }


def test_workers_serve_and_hot_reload_a_store_they_cannot_write(
    read_only_service: Service, store: ModelRegistry, versions: list[str]
) -> None:
    service = read_only_service
    workers = service.worker_pids()
    assert workers and not any(overrides_file_modes(pid) for pid in [service.process.pid, *workers])
    before = _listing(store.root)
    _serve(service, versions[0])
    assert _listing(store.root) == before

    # Another process (the CLI, with write access) promotes the second version; the workers follow it.
    cli = [sys.executable, "-m", "app.cli", "--store", str(store.root), "promote", versions[1]]
    subprocess.run(cli, cwd=REPO, check=True, capture_output=True)
    promoted = _read_only(store.root)
    assert wait_for(lambda: set(workers) <= _swapped_to(service, versions[1]), timeout=15, every=0.2)
    _serve(service, versions[1])
    assert _listing(store.root) == promoted
    refused = [e for e in service.logs() if "ermission" in str(e)]
    assert refused == []
