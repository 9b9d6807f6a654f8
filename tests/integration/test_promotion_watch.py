"""The promotion watch with real processes: supervisor, two gunicorn workers, the drift monitor, the CLI.

A candidate worse on live feedback than its parent is rolled back by the monitor within the watch period while
requests keep succeeding; a candidate as good as its parent stays, and its watch passes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.ml.data import Corpus
from app.ml.labels import LABELS
from app.ml.registry import ModelRegistry
from app.ml.train import train_and_register
from tests.conftest import SMALL_PARAMS
from tests.integration.services import FEEDBACK, REPO, Service, start_service, wait_for

pytestmark = pytest.mark.integration

MIN_LABELS = 40


@pytest.fixture(scope="module")
def live(rotten_tomatoes: Corpus, small_corpus: Corpus) -> Corpus:
    """120 labelled reviews no model in the store was fitted on: the traffic both versions serve."""
    used = set(small_corpus.texts)
    index = [i for i, t in enumerate(rotten_tomatoes.texts) if t not in used][:120]
    return rotten_tomatoes.subset(np.array(index), "live")


class Traffic:
    """Single predictions in a loop on a thread of their own, counting every status: the service must answer."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.statuses: Counter[int | str] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.service.url, timeout=10) as client:
            while not self.stopping.is_set():
                try:
                    self.statuses[client.post("/v1/predict", json={"text": "a fine, moving film"}).status_code] += 1
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
                time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(15)


def serve_labelled(service: Service, corpus: Corpus) -> dict[str, int]:
    """``corpus`` predicted in batches, every prediction then labelled with the truth: labels per version."""
    labelled: Counter[str] = Counter()
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for start in range(0, len(corpus), 30):
            texts = corpus.texts[start : start + 30]
            response = client.post("/v1/predict/batch", json={"texts": texts})
            assert response.status_code == 200, response.text
            body = response.json()
            for prediction, label in zip(body["predictions"], corpus.labels[start : start + 30], strict=True):
                sent = {"prediction_id": prediction["id"], "label": LABELS[int(label)]}
                assert client.post("/v1/feedback", json=sent, headers=FEEDBACK).status_code == 200
            labelled[body["model_version"]] += len(texts)
    return dict(labelled)


def cli(service: Service, store: ModelRegistry, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "--store", str(store.root), *args],
        cwd=REPO,
        env=service.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def served(service: Service) -> set[str]:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        return {client.post("/v1/predict", json={"text": f"film {i}"}).json()["model_version"] for i in range(20)}


def events(service: Service, version: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{service.url}/v1/models/{version}/events", timeout=10)
    assert response.status_code == 200
    return response.json()["events"]  # type: ignore[no-any-return]


def rollbacks(service: Service) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sentiment_model_rollbacks_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


def watched_service(store: ModelRegistry, tmp_path: Path, watch_seconds: int) -> Service:
    return start_service(
        store,
        tmp_path / "service.log",
        supervised=True,
        SENTIMENT_PROMOTION_WATCH_SECONDS=str(watch_seconds),
        SENTIMENT_PROMOTION_WATCH_MIN_LABELS=str(MIN_LABELS),
        SENTIMENT_DRIFT_BACKEND="builtin",
        SENTIMENT_DRIFT_WINDOW_SIZE="100",
        SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS="0.2",
    )


@pytest.fixture
def bad_candidate(store: ModelRegistry, small_corpus: Corpus) -> str:
    """A version fitted on labels that say the opposite of the truth, registered (not promoted) like a candidate."""
    flipped = Corpus("rotten_tomatoes_sample", small_corpus.texts, 1 - small_corpus.labels, small_corpus.fingerprint)
    return train_and_register(store, flipped, SMALL_PARAMS, promote="never", progress=False).version.version


@pytest.fixture
def bad_service(store: ModelRegistry, tmp_path: Path, bad_candidate: str) -> Iterator[Service]:
    running = watched_service(store, tmp_path, watch_seconds=300)
    yield running
    assert running.stop() == 0


def test_a_candidate_worse_on_live_feedback_is_rolled_back_within_the_watch_while_requests_succeed(
    bad_service: Service, store: ModelRegistry, versions: list[str], bad_candidate: str, live: Corpus
) -> None:
    parent = versions[0]
    assert serve_labelled(bad_service, live) == {parent: len(live)}
    with Traffic(bad_service) as traffic:
        promoted_at = time.monotonic()
        cli(bad_service, store, "promote", bad_candidate, "--watch")
        assert wait_for(lambda: served(bad_service) == {bad_candidate}, 15, every=0.2)
        rolled_back_at = None
        while time.monotonic() - promoted_at < 300:  # the watch period
            serve_labelled(bad_service, live)
            if store.current_version() == parent:
                rolled_back_at = time.monotonic()
                break
        assert rolled_back_at is not None, "not rolled back within the watch period"
        assert wait_for(lambda: served(bad_service) == {parent}, 15, every=0.2)  # the workers follow the pointer
        time.sleep(1)  # requests on the restored version too
    assert traffic.statuses and set(traffic.statuses) == {200}, traffic.statuses
    print(f"rolled back {rolled_back_at - promoted_at:.1f} s after the promotion; requests: {dict(traffic.statuses)}")
    trail = events(bad_service, bad_candidate)
    assert [(e["event"], e["actor"], e["trigger"]) for e in trail] == [
        ("promoted", "cli", "manual"),
        ("rolled_back", "monitor", "watch"),
    ]
    rolled = trail[1]["details"]
    assert rolled["reason"] == "realised_accuracy" and rolled["restored"] == parent
    assert rolled["realised"]["new"]["labelled"] >= MIN_LABELS and rolled["realised"]["drop"] > 20
    model = httpx.get(f"{bad_service.url}/v1/models/{bad_candidate}", timeout=10).json()
    assert model["stage"] == "rejected" and not model["current"]
    assert rollbacks(bad_service) == {"realised_accuracy": 1.0, "estimated_accuracy": 0.0}
    (line,) = [e for e in bad_service.logs() if e.get("event") == "model_auto_rolled_back"]
    assert line["model_version"] == bad_candidate and line["restored_version"] == parent
    assert "rolled_back  monitor (watch)" in cli(bad_service, store, "show", bad_candidate)


@pytest.fixture
def good_service(store: ModelRegistry, tmp_path: Path) -> Iterator[Service]:
    running = watched_service(store, tmp_path, watch_seconds=25)
    yield running
    assert running.stop() == 0


def test_a_candidate_as_good_as_its_parent_stays_and_its_watch_passes(
    good_service: Service, store: ModelRegistry, versions: list[str], live: Corpus
) -> None:
    parent, candidate = versions
    assert serve_labelled(good_service, live) == {parent: len(live)}
    with Traffic(good_service) as traffic:
        cli(good_service, store, "promote", candidate, "--watch")
        assert wait_for(lambda: served(good_service) == {candidate}, 15, every=0.2)
        serve_labelled(good_service, live)  # the same reviews, with the truth: as accurate as the parent on them

        def passed() -> bool:
            serve_labelled(good_service, live.subset(np.arange(0, 30), "more"))
            return any(e["event"] == "watch_passed" for e in events(good_service, candidate))

        assert wait_for(passed, 60, every=1)
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert store.current_version() == candidate and served(good_service) == {candidate}
    trail = events(good_service, candidate)
    assert [e["event"] for e in trail] == ["promoted", "watch_passed"]
    assert trail[1]["actor"] == "monitor" and trail[1]["details"]["realised"]["new"]["labelled"] >= len(live)
    assert rollbacks(good_service) == {"realised_accuracy": 0.0, "estimated_accuracy": 0.0}
