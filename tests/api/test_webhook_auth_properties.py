"""Property-based tests of the webhook and admin credentials: whatever the headers and body, the answer is
2xx, 401, 403 or 422, never a 5xx, and only the right credentials get a 2xx.

In-process (``TestClient(create_app(settings))``) for speed, with a bearer token, the admin token and
Grafana's HMAC secret over ``<timestamp>:<body>``; then, with fewer examples, against the real gunicorn
service (``tests/integration/services.py``), where every answer must also have a JSON body. The jobs table
holds a retrain that started just now and the cooldown is a day, so a request that does get through never
starts a retrain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.main import create_app
from app.ml.registry import ModelRegistry
from app.settings import Settings
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJobRepository
from tests.conftest import ADMIN_TOKEN, WEBHOOK_TOKEN
from tests.integration.services import Service, start_service

HMAC_SECRET = "fuzz-hmac-secret"
SIGNATURE = "X-Grafana-Alerting-Signature"
TIMESTAMP = "X-Grafana-Alerting-Timestamp"
ALLOWED = {401, 403, 422}
# Fixed generation (derandomize: the seed comes from the test's name) and no example database, so every run
# sends the same requests; 300 examples per property take a few seconds in-process. No shrinking: the
# properties collect every bad answer themselves and report them all at the end (shrinking one 5,000-digit
# header took minutes).
PROPERTY = hypothesis_settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVED = hypothesis_settings(PROPERTY, max_examples=120)
"""Against gunicorn: 120 examples per property (with the server's start, about 15 s for the module)."""
SEEDED_JOB = "cooldown"
Wire = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Header:
    """A generated header value and whether it is the right credential."""

    value: bytes | None
    valid: bool


def _latin1_or_utf8(text: str) -> bytes:
    # Servers decode header bytes as latin-1 (starlette does): send latin-1 where it fits, else UTF-8 bytes.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


# What a header value can be on the wire: no CR, LF or NUL (the HTTP parser refuses those before the app).
_header_text = st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=64)
_huge = st.integers(1000, 20000).map(lambda n: "x" * n)
_basic = st.binary(max_size=48).map(lambda raw: "Basic " + base64.b64encode(raw).decode())

_VALID_AUTH = Header(f"Bearer {WEBHOOK_TOKEN}".encode(), valid=True)
authorization = st.one_of(
    st.just(Header(None, valid=False)),
    st.just(_VALID_AUTH),
    st.one_of(
        _header_text.map(lambda t: "Bearer " + t),
        _header_text.map(lambda t: "bearer " + t),
        _basic,
        _header_text.map(lambda t: "Basic " + t),
        _header_text,
        _huge.map(lambda t: "Bearer " + t),
        st.sampled_from(["Bearer", "Bearer ", f"Bearer {WEBHOOK_TOKEN}x", f"Bearer {ADMIN_TOKEN}", "Digest x"]),
    ).map(lambda t: Header(_latin1_or_utf8(t), valid=False)),
)

# Timestamps: non-numeric, negative, huge, float strings, unicode digits (latin-1 superscripts and others).
HOSTILE_STAMPS = ["abc", "", " ", "-1", "1.5", "1e9", "NaN", "inf", "0x10", "²", "¹²³", "١٢٣", "１２３", "9" * 5000]
_numeric_like = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.text("0123456789²³¹١٢٣٤٥６７８９ -+.eE_", min_size=1, max_size=20),
    _header_text,
)


timestamps = st.one_of(
    st.just(("fresh", True)),
    st.just((None, False)),
    st.sampled_from(HOSTILE_STAMPS).map(lambda t: (t, False)),
    _numeric_like.map(lambda t: (t, False)),
    st.integers(301, 10**9).map(lambda age: (f"old:{age}", False)),
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_alert = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved", "pending"]),
        "labels": st.dictionaries(st.sampled_from(["alertname", "severity"]), st.text(max_size=30), max_size=2)
        | st.just({"alertname": "SentimentDriftDetected"}),
        "startsAt": st.text(max_size=30),
        "fingerprint": st.text(max_size=16),
    }
)
_notification = st.fixed_dictionaries(
    {
        "version": st.sampled_from(["1", "4", 1, ""]),
        "status": st.sampled_from(["firing", "resolved", "x"]),
        "alerts": st.lists(_alert, max_size=3),
    },
    optional={"orgId": st.integers() | st.text(max_size=5), "receiver": st.text(max_size=10)},
)
bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    _notification.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=200).map(str.encode),
)


@pytest.fixture
def hooks(settings: Settings) -> Iterator[TestClient]:
    signed = settings.model_copy(
        update={
            "grafana_hmac_secret": HMAC_SECRET,
            "grafana_timestamp_header": TIMESTAMP,
            "retrain_cooldown_seconds": 86400.0,
        }
    )
    _seed_cooldown(signed.prediction_log_url)
    with TestClient(create_app(signed), raise_server_exceptions=False) as client:
        yield client


def _seed_cooldown(url: str) -> None:
    """A retrain that just ended: the cooldown runs, and no request gets to start one."""
    seeded = Database(url)
    jobs = RetrainJobRepository(seeded)
    jobs.create_job(SEEDED_JOB, "manual", "seeded", time.time())
    jobs.finish_job(SEEDED_JOB, "succeeded", "skipped_no_new_labels", {})
    seeded.dispose()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, _session_store: tuple[Path, list[str]]) -> Iterator[Service]:
    """The real gunicorn (two workers) over a private store copy, configured as ``hooks``."""
    workdir = tmp_path_factory.mktemp("webhook-auth")
    shutil.copytree(_session_store[0], workdir / "model_store")
    service = start_service(
        ModelRegistry(workdir / "model_store"),
        workdir / "gunicorn.log",
        SENTIMENT_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        SENTIMENT_ADMIN_TOKEN=ADMIN_TOKEN,
        SENTIMENT_GRAFANA_HMAC_SECRET=HMAC_SECRET,
        SENTIMENT_GRAFANA_TIMESTAMP_HEADER=TIMESTAMP,
        SENTIMENT_RETRAIN_COOLDOWN_SECONDS="86400",
    )
    _seed_cooldown(_database_url(service))
    yield service
    service.stop()


@pytest.fixture
def served_hooks(served: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


def _database_url(service: Service) -> str:
    return f"sqlite:///{Path(service.env['SENTIMENT_STATE_DIR']) / 'predictions.db'}"


def _as_sent(value: bytes) -> bytes:
    """In-process, a header value reaches the app as generated."""
    return value


def _on_the_wire(value: bytes) -> bytes:
    """A header value as a real client sends it: no control character (the server's HTTP parser answers 400
    before the app sees one; the client, h11, refuses most) and no surrounding whitespace (h11 refuses it,
    and the parser would strip it)."""
    return bytes(b for b in value if b == 0x09 or 0x20 <= b != 0x7F).strip(b" \t")


def _is_bearer(value: bytes | None, token: str) -> bool:
    """The documented contract: ``Authorization: Bearer <token>`` (scheme in any case, token trimmed)."""
    scheme, _, given = (value or b"").partition(b" ")
    return scheme.lower() == b"bearer" and given.strip() == token.encode()


def _sign(stamp: bytes | None, body: bytes) -> str:
    message = body if stamp is None else stamp + b":" + body
    return hmac.new(HMAC_SECRET.encode(), message, hashlib.sha256).hexdigest()


def _describe(response_status: int, headers: dict[str, bytes], body: bytes, text: str) -> str:
    shown = {
        name: value[:80] + (b"... (%d bytes)" % len(value) if len(value) > 80 else b"")
        for name, value in headers.items()
    }
    return f"status {response_status} for headers={shown!r} body={body[:120]!r}: {text[:200]}"


def _judge(response: httpx.Response, headers: dict[str, bytes], body: bytes, valid: bool) -> str | None:
    """What is wrong with ``response`` (None: nothing): a status other than 2xx, 401, 403 or 422, a 2xx to
    invalid credentials, or a body that is not JSON."""
    described = _describe(response.status_code, headers, body, response.text)
    if not (response.status_code < 300 or response.status_code in ALLOWED):
        return described
    if response.status_code < 300 and not valid:
        return "accepted without every credential: " + described
    try:
        response.json()
    except ValueError:
        return "not JSON: " + described
    return None


def _report(bad: list[str]) -> str:
    distinct = sorted(set(bad))
    return f"{len(bad)} bad answers ({len(distinct)} distinct):\n" + "\n".join(distinct[:30])


def _grafana_headers(
    auth: Header, stamp: tuple[str | None, bool], signature: str | None, body: bytes
) -> dict[str, bytes]:
    headers: dict[str, bytes] = {"Content-Type": b"application/json"}
    if auth.value is not None:
        headers["Authorization"] = auth.value
    raw_stamp, _ = stamp
    stamp_bytes = None
    if raw_stamp == "fresh":
        stamp_bytes = str(int(time.time())).encode()
    elif raw_stamp is not None and raw_stamp.startswith("old:"):
        stamp_bytes = str(int(time.time()) - int(raw_stamp[4:])).encode()
    elif raw_stamp is not None:
        stamp_bytes = _latin1_or_utf8(raw_stamp)
    if stamp_bytes is not None:
        headers[TIMESTAMP] = stamp_bytes
    if signature == "valid":
        headers[SIGNATURE] = _sign(stamp_bytes, body).encode()
    elif signature is not None:
        headers[SIGNATURE] = _latin1_or_utf8(signature)
    return headers


def _grafana_property(client: httpx.Client, wire: Wire, examples: hypothesis_settings) -> list[str]:
    """Arbitrary Authorization, signature, timestamp and body on the Grafana webhook: the bad answers."""
    bad: list[str] = []

    @examples
    @given(
        auth=authorization,
        stamp=timestamps,
        signature=st.one_of(
            st.just("valid"), st.just(None), _header_text, st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)
        ),
        body=bodies,
    )
    def check(auth: Header, stamp: tuple[str | None, bool], signature: str | None, body: bytes) -> None:
        headers = {name: wire(value) for name, value in _grafana_headers(auth, stamp, signature, body).items()}
        response = client.post("/v1/webhooks/grafana", content=body, headers=headers)
        valid = _is_bearer(headers.get("Authorization"), WEBHOOK_TOKEN) and stamp[1] and signature == "valid"
        if (wrong := _judge(response, headers, body, valid)) is not None:
            bad.append(wrong)

    for hostile in HOSTILE_STAMPS:  # each known-hostile timestamp at least once, every other credential right
        check = example(auth=_VALID_AUTH, stamp=(hostile, False), signature="valid", body=b"{}")(check)
    check()
    return bad


def _bearer_property(client: httpx.Client, route: str, wire: Wire, examples: hypothesis_settings) -> list[str]:
    """Arbitrary Authorization headers (and bodies, with Grafana's headers thrown in) on a bearer route: the
    bad answers."""
    token = WEBHOOK_TOKEN if "webhooks" in route else ADMIN_TOKEN
    bad: list[str] = []

    @examples
    @given(
        auth=authorization, body=bodies, extra=st.dictionaries(st.sampled_from([SIGNATURE, TIMESTAMP]), _header_text)
    )
    def check(auth: Header, body: bytes, extra: dict[str, str]) -> None:
        headers = {"Content-Type": b"application/json", **{k: _latin1_or_utf8(v) for k, v in extra.items()}}
        if auth.value is not None:
            headers["Authorization"] = (
                auth.value.replace(WEBHOOK_TOKEN.encode(), token.encode()) if auth.valid else auth.value
            )
        headers = {name: wire(value) for name, value in headers.items()}
        if route == "/v1/retrain/jobs":
            response = client.get(route, headers=headers)
        else:
            response = client.post(route, content=body, headers=headers)
        if (wrong := _judge(response, headers, body, _is_bearer(headers.get("Authorization"), token))) is not None:
            bad.append(wrong)

    check()
    return bad


BEARER_ROUTES = ["/v1/webhooks/alertmanager", "/v1/retrain", "/v1/retrain/jobs"]


def test_grafana_webhook_answers_only_2xx_401_403_422_and_2xx_only_with_every_credential(hooks: TestClient) -> None:
    """Arbitrary Authorization, signature, timestamp and body on the Grafana webhook: never a 5xx; a 2xx
    only with the bearer token, a fresh timestamp and the right signature."""
    bad = _grafana_property(hooks, _as_sent, PROPERTY)
    assert bad == [], _report(bad)


@pytest.mark.parametrize("route", BEARER_ROUTES)
def test_bearer_routes_answer_only_2xx_401_403_422_and_2xx_only_with_their_token(hooks: TestClient, route: str) -> None:
    """Arbitrary Authorization headers (and bodies, with Grafana's headers thrown in) on the Alertmanager
    webhook and the admin routes: never a 5xx, and a 2xx only with that route's own token."""
    bad = _bearer_property(hooks, route, _as_sent, PROPERTY)
    assert bad == [], _report(bad)


@pytest.mark.integration
def test_gunicorn_grafana_webhook_answers_only_2xx_401_403_422_with_json(served_hooks: httpx.Client) -> None:
    """The Grafana property against the real gunicorn, with headers as a real client sends them: never a
    5xx or a parser's 400, a 2xx only with every credential, and a JSON body every time."""
    bad = _grafana_property(served_hooks, _on_the_wire, SERVED)
    assert bad == [], _report(bad)


@pytest.mark.integration
@pytest.mark.parametrize("route", BEARER_ROUTES)
def test_gunicorn_bearer_routes_answer_only_2xx_401_403_422_with_json(served_hooks: httpx.Client, route: str) -> None:
    """The bearer property against the real gunicorn: never a 5xx, a 2xx only with the route's token, JSON."""
    bad = _bearer_property(served_hooks, route, _on_the_wire, SERVED)
    assert bad == [], _report(bad)


@pytest.mark.integration
def test_no_request_to_gunicorn_started_a_retrain(served: Service) -> None:
    """After every property against gunicorn, the jobs table holds the seeded job only."""
    database = Database(_database_url(served))
    try:
        assert [job.id for job in RetrainJobRepository(database).recent()] == [SEEDED_JOB]
    finally:
        database.dispose()


def test_no_request_started_a_retrain(hooks: TestClient) -> None:
    """Valid credentials with a firing drift alert meet the cooldown: 202 ``cooldown``, no job recorded but
    the seeded one."""
    body = json.dumps(
        {
            "version": "4",
            "status": "firing",
            "alerts": [{"status": "firing", "labels": {"alertname": "SentimentDriftDetected"}, "startsAt": "t"}],
        }
    ).encode()
    response = hooks.post(
        "/v1/webhooks/alertmanager",
        content=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {WEBHOOK_TOKEN}"},
    )
    assert response.status_code == 202 and response.json()["status"] == "cooldown", response.text
    jobs = hooks.get("/v1/retrain/jobs", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert [job["id"] for job in jobs.json()] == [SEEDED_JOB]
