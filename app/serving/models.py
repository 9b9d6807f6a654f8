"""The model a worker serves: loaded and verified at start, swapped when the store's pointer moves."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from app.errors import ModelNotReadyError, SentimentServiceError
from app.ml.model import ProbaFunction
from app.ml.registry import REFERENCE_ARTIFACT, LoadedModel, ModelRegistry
from app.monitoring.metrics import MODEL_INFO
from app.process_memory import release_free_memory

log = structlog.get_logger(__name__)

# Edge cases the compiled path must agree on besides real held-out texts: nothing known, emoji, noise.
_EDGE_PROBES = ["", "qzxv wkpj", "\U0001f600\U0001f44d", "NOT bad!!! :) @someone http://x.y/z", "a " * 400]
PROBE_COUNT = 64
LOAD_SWITCH_INTERVAL = 0.0005
"""GIL switch interval (s) while a worker loads a new version on its loader thread, instead of Python's
5 ms: the event loop gets the GIL back sooner. Measured on a warm worker: event-loop stalls over 5 ms
during a load fell from 66 ms to 25 ms in total."""
LOAD_TURN_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServedModel:
    """What a worker predicts with: a verified version and its fastest faithful ``predict_proba``."""

    version: str
    metadata: dict[str, Any]
    predict_proba: ProbaFunction
    compiled: bool


def prepare(model: LoadedModel) -> ServedModel:
    """Serve ``model`` through its fastest ``predict_proba`` that reproduces it on held-out probes.

    Only that function is kept: a compiled form holds the vocabularies and weights it needs, and the rest of
    the loaded model (the classifier's own coefficients, about 8 MB) is freed."""
    try:
        probes = list(model.read_json(REFERENCE_ARTIFACT)["texts"][:PROBE_COUNT])
    except (OSError, ValueError, KeyError, TypeError):
        probes = []
    predict, compiled = model.model.serving_predictor(probes + _EDGE_PROBES)
    return ServedModel(model.version, model.metadata, predict, compiled)


class ModelManager:
    """Holds the current :class:`ServedModel` of one worker.

    A new version is loaded and verified completely before it replaces the old one, so a version that
    fails to load is never served and in-flight requests finish on the model they started with.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        reload_interval: float,
        retry_failed_after: float = 60.0,
        load_lock: Path | None = None,
    ) -> None:
        self.registry = registry
        self.reload_interval = reload_interval
        self.retry_failed_after = retry_failed_after
        self.load_lock = load_lock  # workers of one host take turns loading (see _turn)
        self._model: ServedModel | None = None
        self._failed: tuple[str, float] | None = None  # (version, monotonic time) of the last failed load

    @property
    def current(self) -> ServedModel:
        """The served model; :class:`ModelNotReadyError` if no verified model is loaded."""
        if self._model is None:
            raise ModelNotReadyError("no verified model is loaded; see /readyz and the service log")
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def sync(self) -> bool:
        """Load the store's current version if it differs from the served one; True if it swapped."""
        try:
            wanted = self.registry.current_version()
        except SentimentServiceError as exc:
            log.error("model_pointer_unreadable", reason=exc.message)
            return False
        served = self._model.version if self._model else None
        if wanted is None or wanted == served:
            return False
        if self._failed and self._failed[0] == wanted and time.monotonic() - self._failed[1] < self.retry_failed_after:
            return False
        switch_interval = sys.getswitchinterval()
        try:
            with self._turn():
                sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
                model = prepare(self.registry.load(wanted))
        except Exception as exc:  # anything that stops a load keeps the old model serving
            self._failed = (wanted, time.monotonic())
            log.error("model_load_failed", model_version=wanted, served_version=served, reason=str(exc))
            return False
        finally:
            sys.setswitchinterval(switch_interval)
        self._model, self._failed = model, None
        release_free_memory()  # what unpickling left free in the loader thread's arena, and the old version
        if gc.get_freeze_count():  # a worker that froze its start-up objects (app.gunicorn_worker) freezes each model
            gc.freeze()
        if served:
            MODEL_INFO.labels(version=served).set(0)
        MODEL_INFO.labels(version=wanted).set(1)
        log.info("model_swapped", model_version=wanted, previous_version=served, compiled=model.compiled)
        return True

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """One worker of the host loads at a time, so a promotion never takes every core from serving.

        An ``flock`` that dies with its holder; after ``LOAD_TURN_TIMEOUT`` s the load goes ahead anyway.
        """
        if self.load_lock is None:
            yield
            return
        self.load_lock.parent.mkdir(parents=True, exist_ok=True)
        with self.load_lock.open("a+") as handle:
            deadline = time.monotonic() + LOAD_TURN_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("model_load_turn_timeout", lock=str(self.load_lock))
                        break
                    time.sleep(0.02)
            yield  # closing the file releases the lock

    async def watch(self) -> None:
        """Poll the pointer every ``reload_interval`` seconds; loads run on a thread, off the event loop.

        Nothing a poll raises ends the watch (``model_watch_failed``): the next poll tries again.
        """
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                await asyncio.to_thread(self.sync)
            except Exception as exc:
                log.exception("model_watch_failed", reason=str(exc))
