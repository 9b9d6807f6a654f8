"""The worker's watcher survives a corrupt pointer, a refused signature and any error, and keeps following."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from app.ml.registry import POINTER, ModelRegistry
from app.serving.models import ModelManager

CORRUPT_POINTERS = ["not json", "[]", '{"version": 5}', '{"version": "v-unknown"}']


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("content", CORRUPT_POINTERS)
def test_a_corrupt_pointer_is_logged_and_the_served_model_stays(
    store: ModelRegistry, versions: list[str], content: str
) -> None:
    manager = ModelManager(store, reload_interval=1)
    manager.sync()
    (store.root / POINTER).write_text(content)
    with capture_logs() as logs:
        assert manager.sync() is False
    assert manager.current.version == versions[0]
    assert logs[-1]["event"] == "model_pointer_unreadable" and POINTER in logs[-1]["reason"]


def test_a_worker_starting_on_a_corrupt_pointer_is_unready_not_crashed(store: ModelRegistry) -> None:
    (store.root / POINTER).write_text("[]")
    manager = ModelManager(store, reload_interval=1)
    with capture_logs() as logs:
        assert manager.sync() is False
    assert not manager.ready and logs[-1]["event"] == "model_pointer_unreadable"


def test_the_watch_outlives_a_corrupt_pointer_and_serves_the_next_promotion(
    store: ModelRegistry, versions: list[str]
) -> None:
    old, new = versions
    manager = ModelManager(store, reload_interval=0.05)
    manager.sync()
    pointer = store.root / POINTER
    good = pointer.read_text()

    async def scenario() -> list[str]:
        watch = asyncio.create_task(manager.watch())
        with capture_logs() as logs:
            pointer.write_text("[]")
            await _until(lambda: sum(e["event"] == "model_pointer_unreadable" for e in logs) >= 3)
            assert not watch.done() and manager.current.version == old
            pointer.write_text(good)  # the operator restores the pointer and promotes another version
            store.promote(new)
            await _until(lambda: manager.current.version == new)
        assert not watch.done()
        watch.cancel()
        return [e["event"] for e in logs]

    events = asyncio.run(scenario())
    assert "model_pointer_unreadable" in events and "model_promoted" in events
    assert manager.current.version == new


def test_the_watch_survives_an_unexpected_error(
    store: ModelRegistry, versions: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ModelManager(store, reload_interval=0.05)
    calls = []

    def sync() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return ModelManager.sync(manager)

    monkeypatch.setattr(manager, "sync", sync)

    async def scenario() -> None:
        watch = asyncio.create_task(manager.watch())
        await _until(lambda: manager.ready)
        watch.cancel()

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert logs[0]["event"] == "model_watch_failed" and logs[0]["reason"] == "unexpected"
    assert manager.current.version == versions[0]


def test_a_version_with_an_invalid_signature_is_never_served(store: ModelRegistry, versions: list[str]) -> None:
    keyed = ModelRegistry(store.root, b"a-key-the-store-writer-cannot-read")
    keyed.sign(versions[0])
    manager = ModelManager(keyed, reload_interval=1)
    manager.sync()
    # Someone who can write the store but not read the key points it at an unsigned version.
    (store.root / POINTER).write_text(json.dumps({"version": versions[1], "history": [versions[0]]}))
    with capture_logs() as logs:
        assert manager.sync() is False
    assert manager.current.version == versions[0]
    assert [e["event"] for e in logs][-2:] == ["model_signature_invalid", "model_load_failed"]
