"""The worker's model: loaded verified, swapped when the pointer moves, kept when a new one is bad."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app.errors import ModelNotReadyError
from app.ml.registry import MODEL_ARTIFACT, ModelRegistry
from app.serving.models import ModelManager


def test_sync_loads_the_current_version_through_the_compiled_path(store: ModelRegistry, versions: list[str]) -> None:
    manager = ModelManager(store, reload_interval=1)
    assert not manager.ready
    assert manager.sync() is True
    assert manager.current.version == versions[0] and manager.current.compiled
    assert manager.sync() is False  # nothing changed


def test_sync_follows_promote_and_rollback(store: ModelRegistry, versions: list[str]) -> None:
    manager = ModelManager(store, reload_interval=1)
    manager.sync()
    store.promote(versions[1])
    with capture_logs() as logs:
        assert manager.sync() is True
    assert manager.current.version == versions[1]
    assert logs[-1]["event"] == "model_swapped" and logs[-1]["previous_version"] == versions[0]
    store.rollback()
    manager.sync()
    assert manager.current.version == versions[0]


def test_a_version_that_fails_verification_is_never_served(store: ModelRegistry, versions: list[str]) -> None:
    manager = ModelManager(store, reload_interval=1)
    manager.sync()
    store.promote(versions[1])
    artifact = store.root / versions[1] / MODEL_ARTIFACT
    artifact.chmod(0o644)
    artifact.write_bytes(artifact.read_bytes()[:-10])
    with capture_logs() as logs:
        assert manager.sync() is False
    assert manager.current.version == versions[0]
    assert [e["event"] for e in logs][-1] == "model_load_failed"


def test_no_model_means_not_ready(empty_store: ModelRegistry) -> None:
    manager = ModelManager(empty_store, reload_interval=1)
    manager.sync()
    assert not manager.ready
    with pytest.raises(ModelNotReadyError):
        _ = manager.current


def test_workers_of_a_host_take_turns_loading(store: ModelRegistry, versions: list[str], tmp_path: Path) -> None:
    lock = tmp_path / "model-load.lock"
    manager = ModelManager(store, reload_interval=1, load_lock=lock)
    with lock.open("a+") as other_worker:
        fcntl.flock(other_worker, fcntl.LOCK_EX)  # another worker is loading
        loader = threading.Thread(target=manager.sync)
        loader.start()
        time.sleep(1.0)
        assert loader.is_alive() and not manager.ready  # waits its turn
    loader.join(30)
    assert manager.current.version == versions[0]
    assert sys.getswitchinterval() == pytest.approx(0.005)  # restored after the load


FROZEN_WORKER = """
import gc, sys
from pathlib import Path
from app.gunicorn_worker import GC_YOUNG_THRESHOLD, freeze_startup_heap
from app.ml.registry import ModelRegistry
from app.serving.models import ModelManager
manager = ModelManager(ModelRegistry(Path(sys.argv[1])), reload_interval=1)
plain = ModelManager(ModelRegistry(Path(sys.argv[1])), reload_interval=1)
plain.sync()
assert gc.get_freeze_count() == 0, "a process that never froze is left alone"
freeze_startup_heap()
started = gc.get_freeze_count()
assert started > 0 and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
assert manager.sync()
assert gc.get_freeze_count() > started, "the loaded model joins the frozen objects"
"""


def test_a_worker_that_froze_its_start_up_heap_freezes_each_model_it_loads(store: ModelRegistry) -> None:
    """In a fresh interpreter (freezing is for the life of a process): models load as before in a process
    that never froze; in a gunicorn worker the start-up objects and then each loaded model are frozen."""
    result = subprocess.run(
        [sys.executable, "-c", FROZEN_WORKER, str(store.root)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
