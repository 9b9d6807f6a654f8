"""Two instances of the real service share one PostgreSQL and one object store, and nothing else.

Each instance is a whole supervised service (``app.supervisor``: gunicorn with 2 workers and a drift monitor) on
its own port, with its own state dir and metrics dir. The model store is ``s3://`` (SeaweedFS) with its rows and
current pointer in PostgreSQL, which also holds the predictions, feedback, drift checks, retrain jobs and alert
claims. One module-scoped setup; the tests run in file order on it, with a client thread sending predictions
to both instances the whole time (its failures are checked last). Intervals are short: pointer polls every 1 s,
a drift check per 20 predictions or every second, a retrain cooldown of 5 s.

Steps: (1) predictions sent to both land in one log and both show the same drift checks; (2) 20 concurrent
alerts split across the instances start exactly one retrain, which promotes (1500 labelled tweets in the log,
margin 3 points as in test_act_e2e) and every worker of both instances serves it within 10 s; (3) a CLI
rollback on one host is served by both within 10 s; (4) SIGKILL of the leading monitor hands drift checking
to the other instance within 15 s; (5) a SIGKILLed retrain frees the lock: an alert after the cooldown starts
a retrain that takes it; (6) not one request failed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from app.migrations import upgrade
from app.ml.data import load_tweets
from app.ml.registry import REFERENCE_ARTIFACT, ModelRegistry
from app.retrain.lock import AdvisoryRetrainLock
from app.settings import Settings
from app.storage.database import Database
from app.storage.predictions import PredictionRepository
from tests.integration.services import REPO, Service, register_copy, start_service, wait_for
from tests.postgres import PostgresCluster, postgres  # noqa: F401  fixtures
from tests.s3 import OTHER_AWS_CREDENTIALS, SeaweedS3, seaweedfs  # noqa: F401  fixtures
from tests.traffic import log_predictions

pytestmark = pytest.mark.integration

WEBHOOK_TOKEN = "two-instances-webhook-token"
ADMIN_TOKEN = "two-instances-admin-token"
HOOK = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
PAYLOAD = json.loads((REPO / "tests" / "fixtures" / "payloads" / "alertmanager-firing.json").read_text())
WORKERS = 2
COOLDOWN_SECONDS = 5.0
SERVED_WITHIN_SECONDS = 10.0
TAKEOVER_WITHIN_SECONDS = 15.0
FEEDBACK_LABELS = 1500
WEBHOOK_STATUSES = {"retrain_started", "already_running", "duplicate", "cooldown"}


def alert(starts_at: str) -> dict[str, Any]:
    """The Alertmanager firing fixture as a new firing (its identity is fingerprint and ``startsAt``)."""
    payload = copy.deepcopy(PAYLOAD)
    payload["alerts"][0]["startsAt"] = starts_at
    return payload


def log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@dataclass
class Answer:
    instance: int
    sent: float
    version: str | None


@dataclass
class Load:
    """Steady predictions to both instances in turn; every answer's version, every failure."""

    urls: list[str]
    texts: list[str]
    rate: float = 8.0
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    began: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True, name="two-instances-load")

    def run(self) -> None:
        clients = [httpx.Client(base_url=url, timeout=30) for url in self.urls]
        begin, i = time.monotonic(), 0
        self.began = time.time()
        try:
            while not self.stopping.is_set():
                delay = begin + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                instance = i % len(clients)
                sent = time.time()
                try:
                    response = clients[instance].post("/v1/predict", json={"text": self.texts[i % len(self.texts)]})
                except httpx.HTTPError as exc:
                    self.failures.append(f"instance {instance}: {type(exc).__name__}: {exc}")
                else:
                    if response.status_code != 200:
                        self.failures.append(f"instance {instance}: {response.status_code} {response.text[:200]}")
                    else:
                        version = response.json()["model_version"]
                        if response.headers.get("X-Model-Version") != version:
                            self.failures.append(f"instance {instance}: header {response.headers} vs body {version}")
                        self.answers.append(Answer(instance, sent, version))
                i += 1
        finally:
            for client in clients:
                client.close()

    def since(self, moment: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent >= moment]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)


@dataclass
class Pair:
    services: list[Service]
    database_url: str
    store_url: str
    registry: ModelRegistry
    engine: Engine
    load: Load
    original: str

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(query), params).scalar()

    def rows(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(query), params).mappings()]

    def pointer(self) -> tuple[str | None, float]:
        (row,) = self.rows("SELECT version, updated_at FROM model_pointer")
        return row["version"], float(row["updated_at"])

    def job(self, job_id: str) -> dict[str, Any]:
        (row,) = self.rows("SELECT * FROM retrain_jobs WHERE id = :id", id=job_id)
        return row

    def retrain_pids(self, job_id: str | None = None) -> list[int]:
        return [
            pid
            for service in self.services
            for pid, (_, cmd) in service.descendants().items()
            if "app.retrain.job" in cmd and (job_id is None or job_id in cmd)
        ]

    def retrain_lock_held(self) -> bool:
        probe = AdvisoryRetrainLock(self.database_url, engine=self.engine)
        return probe.held_elsewhere()


def swaps_to(service: Service, version: str, after: float) -> dict[int, float]:
    """Each live worker's first ``model_swapped`` to ``version`` logged after ``after``: pid -> time."""
    found: dict[int, float] = {}
    for event in service.logs():
        if event.get("event") == "model_swapped" and event.get("model_version") == version:
            moment = log_time(event)
            if moment >= after and int(event["pid"]) not in found:  # type: ignore[call-overload]
                found[int(event["pid"])] = moment  # type: ignore[call-overload]
    return {pid: moment for pid, moment in found.items() if pid in service.worker_pids()}


def leader_samples(service: Service) -> dict[int, float]:
    """``sentiment_drift_monitor_leader`` by monitor pid, from the instance's merged /metrics."""
    body = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {
        int(sample.labels["pid"]): sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "sentiment_drift_monitor_leader"
        for sample in family.samples
    }


def served_everywhere(pair: Pair, version: str, promoted_at: float) -> dict[str, Any]:
    """Wait until every worker of both instances swapped to ``version`` and both instances answered with it
    for a while; return the swap latencies and the answers' versions after the deadline."""

    def all_swapped() -> list[dict[int, float]] | None:
        swaps = [swaps_to(service, version, promoted_at - 1) for service in pair.services]
        return swaps if all(len(s) == WORKERS for s in swaps) else None

    swaps = wait_for(all_swapped, SERVED_WITHIN_SECONDS + 20, every=0.2)
    assert swaps, f"not every worker swapped to {version}: {[swaps_to(s, version, 0) for s in pair.services]}"
    latencies = [moment - promoted_at for s in swaps for moment in s.values()]
    # The steady load, once the last worker swapped: every answer of both instances is the version.
    settle = promoted_at + max(latencies) + 0.1
    assert wait_for(lambda: len({a.instance for a in pair.load.since(settle)}) == 2, 30, every=0.2)
    after = {(a.instance, a.version) for a in pair.load.since(settle)}
    return {"latencies": latencies, "answers_after": after, "settle": settle - promoted_at}


def seed(registry: ModelRegistry, full_store: tuple[Path, str], database_url: str) -> tuple[str, list[str]]:
    """Register the session's model trained on the whole corpus (a retrain's base) into the S3-backed
    registry (uploaded, then its row) and promote it; log labelled off-domain feedback (tweets) in the shared
    database, so a retrain has something to learn. Returns the version and in-domain texts for the load."""
    folder = ModelRegistry(full_store[0])
    original = register_copy(registry, folder.get(full_store[1]))
    registry.promote(original)
    loaded = folder.load(full_store[1])
    tweets = load_tweets()  # sorted by label: a random sample holds both
    sample = tweets.subset(np.random.default_rng(0).permutation(len(tweets))[:FEEDBACK_LABELS])
    database = Database(database_url)
    try:
        log_predictions(PredictionRepository(database), loaded.model, original, sample.texts, sample.labels)
    finally:
        database.dispose()
    return original, list(loaded.read_json(REFERENCE_ARTIFACT)["texts"])


def start_two(tmp: Path, env: dict[str, str]) -> list[Service]:
    """Two supervised services at once, each with its own folder (state dir, metrics dir, log)."""
    with ThreadPoolExecutor(2) as pool:
        starting = []
        for index in range(2):
            (tmp / f"instance-{index}").mkdir()
            log_path = tmp / f"instance-{index}" / "service.log"
            starting.append(pool.submit(start_service, None, log_path, WORKERS, supervised=True, **env))
        outcomes = [future.exception() or future.result() for future in starting]
    services = [s for s in outcomes if isinstance(s, Service)]
    failed = [e for e in outcomes if isinstance(e, BaseException)]
    if failed:
        shut_down(services)
        raise failed[0]
    return services


def shut_down(services: list[Service]) -> None:
    # A retrain runs in its own session (a worker's stop must not take it down): kill it explicitly.
    for service in services:
        for pid, (_, cmd) in service.descendants().items():
            if "app.retrain.job" in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for service in services:  # SIGTERM to both at once (once: Service.stop would send a second), then wait
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    codes = []
    for service in services:
        try:
            codes.append(service.process.wait(30))
        except subprocess.TimeoutExpired:
            service.process.kill()
            codes.append(service.process.wait())
        if service.log_handle is not None:
            service.log_handle.close()
    assert codes == [0] * len(services), f"exit codes {codes}"


@pytest.fixture(scope="module")
def pair(
    postgres: PostgresCluster,  # noqa: F811
    seaweedfs: SeaweedS3,  # noqa: F811
    full_store: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pair]:
    began = time.monotonic()
    tmp = tmp_path_factory.mktemp("two-instances")
    name = f"two_{uuid.uuid4().hex[:12]}"
    database_url = postgres.create_database(name)
    upgrade(database_url)
    store_url = f"s3://{seaweedfs.bucket}/two-instances-{uuid.uuid4().hex[:12]}"
    aws = seaweedfs.environ()
    engine = create_engine(database_url, pool_size=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        for key in OTHER_AWS_CREDENTIALS:
            monkeypatch.delenv(key, raising=False)
        settings = Settings(
            model_store=tmp / "unused-folder",
            model_store_url=store_url,
            database_url=database_url,
            state_dir=tmp / "setup-var",
            model_cache_dir=tmp / "setup-cache",
        )
        registry = ModelRegistry.from_settings(settings)
        services: list[Service] = []
        load: Load | None = None
        try:
            original, in_domain = seed(registry, full_store, database_url)
            env = {
                **aws,
                "SENTIMENT_DATABASE_URL": database_url,
                "SENTIMENT_MODEL_STORE_URL": store_url,
                "SENTIMENT_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
                "SENTIMENT_ADMIN_TOKEN": ADMIN_TOKEN,
                "SENTIMENT_RELOAD_INTERVAL_SECONDS": "1",
                "SENTIMENT_DRIFT_BACKEND": "builtin",
                "SENTIMENT_DRIFT_WINDOW_SIZE": "100",
                "SENTIMENT_DRIFT_PERMUTATIONS": "20",
                "SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS": "20",
                "SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS": "1",
                "SENTIMENT_DRIFT_STATUS_REFRESH_SECONDS": "0.5",
                "SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS": "0.2",
                "SENTIMENT_RETRAIN_COOLDOWN_SECONDS": str(COOLDOWN_SECONDS),
                # The loop under test, not the gate's margin: see test_act_e2e (tweet feedback costs this model
                # 0.6-1.3 points on the base holdout).
                "SENTIMENT_RETRAIN_PROMOTION_MARGIN": "0.03",
            }
            services = start_two(tmp, env)
            # Nothing shared but the database and the object store.
            for variable in ("SENTIMENT_STATE_DIR", "PROMETHEUS_MULTIPROC_DIR", "SENTIMENT_PORT"):
                assert services[0].env[variable] != services[1].env[variable]
            for service in services:
                ready = wait_for(lambda s=service: s.serving(WORKERS), 60)
                assert ready, f"{service.url} never served: {service.logs()[-5:]}"
            load = Load([s.url for s in services], in_domain)
            load.thread.start()
            print(f"\nsetup: {time.monotonic() - began:.1f} s")
            yield Pair(services, database_url, store_url, registry, engine, load, original)
        finally:
            if load is not None:
                load.stop()
            shut_down(services)
            registry.close()
            engine.dispose()
            postgres.drop_database(name)


def test_predictions_to_both_land_in_one_log_and_both_show_the_same_latest_drift_check(pair: Pair) -> None:
    ids: list[str] = []
    for index, service in enumerate(pair.services):
        for i in range(20):
            response = httpx.post(
                f"{service.url}/v1/predict", json={"text": f"instance {index} says review {i} was great"}, timeout=10
            )
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
    assert len(set(ids)) == 40
    landed = wait_for(
        lambda: pair.scalar("SELECT count(*) FROM predictions WHERE id = ANY(:ids)", ids=ids) == 40, 15, every=0.2
    )
    assert landed, pair.scalar("SELECT count(*) FROM predictions WHERE id = ANY(:ids)", ids=ids)

    def same_latest_check() -> tuple[Any, ...] | None:
        latest = pair.rows("SELECT id, checked_at, model_version FROM drift_checks ORDER BY id DESC LIMIT 1")
        answers = [httpx.get(f"{s.url}/v1/drift", params={"limit": 1}, timeout=10).json() for s in pair.services]
        if not latest or any(not a["history"] for a in answers):
            return None
        seen = {(a["history"][0]["checked_at"], a["history"][0]["model_version"]) for a in answers}
        current = {a["current"]["checked_at"] for a in answers}
        at = datetime.fromisoformat(answers[0]["history"][0]["checked_at"].replace("Z", "+00:00")).timestamp()
        agree = len(seen) == 1 and current == {answers[0]["history"][0]["checked_at"]}
        return (
            (latest[0]["id"], answers[0]["history"][0]) if agree and abs(at - latest[0]["checked_at"]) < 1e-3 else None
        )

    found = wait_for(same_latest_check, 30, every=0.1)
    assert found, [httpx.get(f"{s.url}/v1/drift", params={"limit": 1}).json() for s in pair.services]
    assert found[1]["model_version"] == pair.original


def test_twenty_concurrent_alerts_on_both_start_one_retrain_served_everywhere_within_ten_seconds(pair: Pair) -> None:
    before = pair.scalar("SELECT count(*) FROM retrain_jobs")
    payload = alert("2026-12-01T10:00:00.000Z")
    together = threading.Barrier(20)

    def post(i: int) -> str:
        together.wait()
        response = httpx.post(
            f"{pair.services[i % 2].url}/v1/webhooks/alertmanager", json=payload, headers=HOOK, timeout=30
        )
        assert response.status_code == 202, response.text
        return str(response.json()["status"])

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(post, range(20)))
    assert statuses.count("retrain_started") == 1, statuses
    assert set(statuses) <= WEBHOOK_STATUSES, statuses
    jobs = pair.rows("SELECT * FROM retrain_jobs ORDER BY started_at")
    assert before == 0 and len(jobs) == 1, jobs
    for service in pair.services:  # both instances took part in the race
        assert any(
            e.get("event") == "request" and e.get("route") == "/v1/webhooks/alertmanager" for e in service.logs()
        )
    job_id = jobs[0]["id"]

    finished = wait_for(lambda: pair.job(job_id)["status"] != "running", 240, every=0.5)
    job = pair.job(job_id)
    assert finished and job["outcome"] == "promoted", job
    promoted = job["candidate_version"]
    version, promoted_at = pair.pointer()
    assert version == promoted != pair.original
    assert pair.scalar("SELECT count(*) FROM retrain_jobs") == 1  # the re-sends never started another

    served = served_everywhere(pair, promoted, promoted_at)
    gate = json.loads(job["details"])["gate"]
    print(
        f"\nretrain {job['finished_at'] - job['started_at']:.1f} s (balanced accuracy base "
        f"{gate['current']['base']:.3f} -> {gate['candidate']['base']:.3f}, feedback {gate['current']['feedback']:.3f} "
        f"-> {gate['candidate']['feedback']:.3f}); swap latencies after promotion "
        f"{sorted(round(x, 2) for x in served['latencies'])} s"
    )
    assert max(served["latencies"]) <= SERVED_WITHIN_SECONDS, served
    assert served["answers_after"] == {(0, promoted), (1, promoted)}, served
    assert pair.load.failures == []


def test_a_cli_rollback_on_one_host_is_served_by_both_within_ten_seconds(pair: Pair) -> None:
    current, _ = pair.pointer()
    assert current != pair.original  # the retrain promoted
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "--store", pair.store_url, "rollback"],
        cwd=REPO,
        env=pair.services[0].env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    version, rolled_back_at = pair.pointer()
    assert version == pair.original
    served = served_everywhere(pair, pair.original, rolled_back_at)
    print(f"\nrollback: swap latencies {sorted(round(x, 2) for x in served['latencies'])} s")
    assert max(served["latencies"]) <= SERVED_WITHIN_SECONDS, served
    assert served["answers_after"] == {(0, pair.original), (1, pair.original)}, served


def test_killing_the_leading_monitor_hands_drift_checking_to_the_other_instance(pair: Pair) -> None:
    def leading() -> tuple[int, int] | None:
        found = [
            (index, pid)
            for index, service in enumerate(pair.services)
            for pid, value in leader_samples(service).items()
            if value == 1.0
        ]
        return found[0] if len(found) == 1 else None

    leader = wait_for(leading, 15, every=0.2)
    assert leader, [leader_samples(s) for s in pair.services]
    index, pid = leader
    old, new = pair.services[index], pair.services[1 - index]
    assert old.monitor_pid() == pid
    assert any(e.get("event") == "monitor_leader_acquired" and e.get("pid") == pid for e in old.logs())
    follower = new.monitor_pid()
    assert follower is not None and leader_samples(new).get(follower) == 0.0

    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    last = pair.scalar("SELECT coalesce(max(id), 0) FROM drift_checks")

    def checks_resumed() -> list[dict[str, Any]] | None:
        rows = pair.rows("SELECT id, checked_at FROM drift_checks WHERE id > :last ORDER BY id", last=last)
        return rows if len(rows) >= 2 else None

    resumed = wait_for(checks_resumed, TAKEOVER_WITHIN_SECONDS + 10, every=0.1)
    assert resumed, "drift checks stopped after the leader's SIGKILL"
    takeover = resumed[0]["checked_at"] - killed
    acquired = [e for e in new.logs() if e.get("event") == "monitor_leader_acquired" and e.get("pid") == follower]
    assert acquired and log_time(acquired[-1]) >= killed - 0.5
    acquired_after = log_time(acquired[-1]) - killed
    assert leader_samples(new).get(follower) == 1.0
    # The killed instance's supervisor restarts its monitor, which now follows.
    restarted = wait_for(lambda: (p := old.monitor_pid()) not in (None, pid) and p, 15, every=0.2)
    assert restarted
    assert wait_for(lambda: leader_samples(old).get(restarted) == 0.0, 15, every=0.2)
    print(
        f"\nmonitor leader takeover: lock taken {acquired_after:.1f} s, "
        f"first drift check {takeover:.1f} s after the SIGKILL"
    )
    assert takeover <= TAKEOVER_WITHIN_SECONDS


def test_a_killed_retrain_frees_the_lock_for_a_later_alert_after_the_cooldown(pair: Pair) -> None:
    latest = pair.scalar("SELECT max(started_at) FROM retrain_jobs")
    wait_for(lambda: time.time() > latest + COOLDOWN_SECONDS + 0.5, COOLDOWN_SECONDS + 5, every=0.2)
    started = httpx.post(
        f"{pair.services[1].url}/v1/webhooks/alertmanager",
        json=alert("2026-12-01T11:00:00.000Z"),
        headers=HOOK,
        timeout=30,
    ).json()
    assert started["status"] == "retrain_started", started
    job_id = started["job_id"]
    # Killed while it runs: once its process holds the advisory lock (it trains for a while: the current
    # version is the original again, so all the labels are new to it).
    pids = wait_for(lambda: pair.retrain_pids(job_id), 30, every=0.1)
    assert pids, "no retrain process"
    assert wait_for(pair.retrain_lock_held, 30, every=0.1), pair.job(job_id)
    assert pair.job(job_id)["status"] == "running"
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(lambda: not pair.retrain_lock_held(), 10, every=0.1), "the lock outlived its process"
    freed_after = time.monotonic() - killed
    assert wait_for(lambda: pair.job(job_id)["status"] == "failed", 15, every=0.2), pair.job(job_id)

    # A later alert (a new firing, re-sent as Alertmanager does) starts a new retrain once the cooldown is over.
    later = alert("2026-12-01T12:00:00.000Z")
    statuses: list[dict[str, Any]] = []

    def send() -> dict[str, Any] | None:
        answer = httpx.post(
            f"{pair.services[0].url}/v1/webhooks/alertmanager", json=later, headers=HOOK, timeout=30
        ).json()
        statuses.append(answer)
        return answer if answer["status"] == "retrain_started" else None

    again = wait_for(send, COOLDOWN_SECONDS + 20, every=0.5)
    assert again, statuses
    assert {s["status"] for s in statuses[:-1]} <= {"cooldown"}, statuses
    # Its process takes the freed lock (a held lock would fail it at once with reason lock_held).
    assert wait_for(lambda: pair.retrain_pids(again["job_id"]) and pair.retrain_lock_held(), 30, every=0.1)
    assert pair.job(again["job_id"])["status"] == "running", pair.job(again["job_id"])
    assert pair.scalar("SELECT count(*) FROM retrain_jobs WHERE status = 'running'") == 1
    print(f"\nkilled retrain's lock freed after {freed_after:.1f} s; statuses before the restart: {len(statuses) - 1}")
    for pid in pair.retrain_pids(again["job_id"]):
        os.kill(pid, signal.SIGKILL)


def test_no_request_failed_under_steady_load_on_both_instances(pair: Pair) -> None:
    pair.load.stop()
    answers = list(pair.load.answers)
    assert pair.load.failures == []
    assert {a.instance for a in answers} == {0, 1}
    # Steady: at least half the intended rate over the whole module (the client waits for each answer).
    duration = time.time() - pair.load.began
    assert len(answers) >= 0.5 * pair.load.rate * duration, (len(answers), duration)
    assert len({a.version for a in answers}) == 2  # it ran through the promotion and the rollback
    for service in pair.services:
        assert not [e for e in service.logs() if e.get("event") in {"unhandled_error", "request_failed"}]
    print(f"\nload: {len(answers)} predictions, 0 failed, over {duration:.0f} s")
