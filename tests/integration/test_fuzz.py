"""Property-based fuzzing of every operation in /openapi.json against the real gunicorn service.

schemathesis generates the requests from the service's own schema (``tests/integration/fuzzing.py`` runs
it) and checks every response: never a 5xx, a documented status code and content type, a body that matches
the documented schema, 405 for undocumented methods. Fixed seed and case count: the same run every time.

Retrains are kept out on purpose. The fuzzer holds the admin and webhook tokens (the protected operations
are fuzzed with and without them), so ``POST /v1/retrain`` and a firing webhook would start real retrains.
The feedback token is fuzzed the same way (feedback without it answers 401).
The service runs with a one-day cooldown and its jobs table holds a retrain that started just now, so every
such request answers ``202 cooldown`` without spawning anything; the test checks no job was created.
Grafana's HMAC signature is not configured here (a generated request cannot sign its body):
``tests/api/test_webhook_auth_properties.py`` fuzzes the signature and timestamp headers in-process.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import schemathesis

from app.ml.registry import ModelRegistry
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJobRepository
from tests.integration.fuzzing import CHECKS, FuzzRun, run_schemathesis, write_config
from tests.integration.services import Service, start_service

pytestmark = pytest.mark.integration

SEED = 20261201
WEBHOOK_TOKEN = "fuzz-webhook-token-0123456789"
ADMIN_TOKEN = "fuzz-admin-token-0123456789"
FEEDBACK_TOKEN = "fuzz-feedback-token-0123456789"
PROTECTED = r"^/v1/(webhooks|retrain|feedback)"
MIN_CASES = 1000
SEEDED_JOB = "fuzz-cooldown"


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory, _session_store: tuple[Path, list[str]]) -> Iterator[Service]:
    """gunicorn over a private store copy whose retrain cooldown runs for a day from now."""
    workdir = tmp_path_factory.mktemp("fuzz")
    root = workdir / "model_store"
    shutil.copytree(_session_store[0], root)
    running = start_service(
        ModelRegistry(root),
        workdir / "gunicorn.log",
        SENTIMENT_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        SENTIMENT_ADMIN_TOKEN=ADMIN_TOKEN,
        SENTIMENT_FEEDBACK_TOKEN=FEEDBACK_TOKEN,
        SENTIMENT_RETRAIN_COOLDOWN_SECONDS="86400",
    )
    seeded = Database(f"sqlite:///{Path(running.env['SENTIMENT_STATE_DIR']) / 'predictions.db'}")
    jobs = RetrainJobRepository(seeded)
    jobs.create_job(SEEDED_JOB, "manual", "seeded", time.time())  # a retrain that just ended: the cooldown runs
    jobs.finish_job(SEEDED_JOB, "succeeded", "skipped_no_new_labels", {})
    seeded.dispose()
    yield running
    running.stop()


def _operations(service: Service) -> set[str]:
    paths = httpx.get(f"{service.url}/openapi.json", timeout=10).json()["paths"]
    return {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods}


def _report(run: FuzzRun) -> str:
    return "\n".join(str(failure) for failure in run.failures) + "".join(f"\nengine error: {e}" for e in run.errors)


def test_fuzzing_every_operation_without_credentials_finds_no_5xx_and_no_schema_violation(
    fuzz_service: Service, tmp_path: Path
) -> None:
    """Over 1,000 generated requests to every operation (admin and webhooks answer 401): each answer is
    documented, well-formed and never a 5xx."""
    config = write_config(tmp_path / "schemathesis.toml", seed=SEED, max_examples=80)
    run, completed = run_schemathesis(f"{fuzz_service.url}/openapi.json", config, tmp_path / "anonymous.ndjson")

    assert run.seed == SEED
    operations = _operations(fuzz_service)
    assert operations <= set(run.cases), completed.stdout[-3000:]
    assert run.total >= MIN_CASES, sorted(run.cases.items())
    # Parameterless GETs (healthz, readyz, models) have few distinct requests to make; the rest get many.
    assert all(run.cases[operation] >= 1 for operation in operations), sorted(run.cases.items())
    assert run.failures == [] and run.errors == [], f"{len(run.failures)} failed checks:\n{_report(run)}"


def test_fuzzing_webhooks_and_admin_with_credentials_finds_no_5xx_and_starts_no_retrain(
    fuzz_service: Service, tmp_path: Path
) -> None:
    """The protected operations fuzzed with the right tokens get past auth and still answer as documented;
    the cooldown holds, so no retrain starts however often ``POST /v1/retrain`` is hit."""
    config = write_config(
        tmp_path / "schemathesis.toml",
        seed=SEED,
        max_examples=60,
        headers_by_path={
            r"^/v1/webhooks/": {"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
            r"^/v1/retrain": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            r"^/v1/feedback": {"Authorization": f"Bearer {FEEDBACK_TOKEN}"},
        },
    )
    run, completed = run_schemathesis(
        f"{fuzz_service.url}/openapi.json",
        config,
        tmp_path / "credentials.ndjson",
        "--include-path-regex",
        PROTECTED,
    )

    protected = {
        op for op in _operations(fuzz_service) if op.split(" ", 1)[1].startswith(("/v1/webhooks", "/v1/retrain"))
    }
    assert protected <= set(run.cases), completed.stdout[-3000:]
    assert len(protected) == 5
    # The tokens worked: admin answers other than 401 (the job list, the cooldown), so the test is not vacuous.
    assert run.statuses["GET /v1/retrain/jobs"][200] > 0, run.statuses
    assert set(run.statuses["POST /v1/feedback"]) - {401}, run.statuses  # past auth: 404, 422, ...
    assert run.statuses["POST /v1/retrain"][202] > 0, run.statuses
    assert run.failures == [] and run.errors == [], f"{len(run.failures)} failed checks:\n{_report(run)}"
    jobs = httpx.get(f"{fuzz_service.url}/v1/retrain/jobs", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert [job["id"] for job in jobs.json()] == [SEEDED_JOB]
    assert not [e for e in fuzz_service.logs() if e.get("event") == "retrain_started"]


# Inputs the fuzzer reaches only by luck, sent every run: each must get a documented answer.
_LONG_VERSION = "v" * 300
_NESTED = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HOSTILE = [
    pytest.param("GET", "/v1/models/{version}", {"version": "a\x00b"}, None, id="nul-in-version"),
    pytest.param("GET", "/v1/models/{version}", {"version": _LONG_VERSION}, None, id="300-char-version"),
    pytest.param("POST", "/v1/predict", {}, _NESTED, id="deeply-nested-json"),
    pytest.param("POST", "/v1/predict/batch", {}, b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="nested-batch"),
    pytest.param("POST", "/v1/feedback", {}, b'{"prediction_id": "a\\u0000b", "label": "positive"}', id="nul-feedback"),
]


@pytest.mark.parametrize(("method", "path", "path_parameters", "body"), HOSTILE)
def test_hostile_inputs_get_documented_answers(
    fuzz_service: Service, method: str, path: str, path_parameters: dict[str, str], body: bytes | None
) -> None:
    """Each known-hostile request gets a status, content type and body that its operation documents."""
    schema = schemathesis.openapi.from_url(f"{fuzz_service.url}/openapi.json")
    case = schema[path][method].Case(path_parameters=path_parameters)
    url = path.format(**{name: quote(value, safe="") for name, value in path_parameters.items()})
    response = httpx.request(
        method,
        f"{fuzz_service.url}{url}",
        content=body,
        headers={"Content-Type": "application/json"} if body is not None else None,
        timeout=30,
    )
    checks = [c for c in schemathesis.checks.CHECKS.get_by_names(list(CHECKS)) if not isinstance(c, type)]
    assert len(checks) == len(CHECKS)
    case.validate_response(response, checks=checks)


@pytest.mark.parametrize("method", ["PROPFIND", "PATCH", "PUT", "DELETE", "MKCOL"])
def test_undocumented_methods_are_405_method_not_allowed(fuzz_service: Service, method: str) -> None:
    """A method the route does not document is 405 in the one error shape, whatever WebDAV verb it is."""
    response = httpx.request(method, f"{fuzz_service.url}/v1/predict", timeout=10)
    assert response.status_code == 405, (response.status_code, response.text[:300])
    assert response.json()["error"]["code"] == "method_not_allowed"
