"""Predictions over HTTP: shapes, the model that answered, and a 4xx JSON error for every bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from app.api.middleware import BodyReadTimeoutMiddleware
from app.main import create_app
from app.settings import Settings

JSON = {"Content-Type": "application/json"}


def test_single_prediction_has_label_confidence_probabilities_and_version(
    client: TestClient, versions: list[str]
) -> None:
    response = client.post("/v1/predict", json={"text": "A warm, witty and wonderfully acted film."})
    assert response.status_code == 200
    body = response.json()
    assert body.keys() == {"id", "sentiment", "confidence", "probabilities", "model_version", "drift"}
    assert body["drift"] == {"drift": False, "p_value": None, "score": None, "checked_at": None, "status": "unknown"}
    assert body["sentiment"] == "positive" and body["model_version"] == versions[0]
    assert body["confidence"] == body["probabilities"]["positive"] > 0.5
    assert body["probabilities"]["negative"] + body["probabilities"]["positive"] == pytest.approx(1)
    assert len(body["id"]) == 32 and response.headers["X-Model-Version"] == versions[0]


def test_batch_keeps_input_order_and_ids_are_unique(client: TestClient, versions: list[str]) -> None:
    texts = ["Dull, lifeless and far too long.", "Loved every minute of it.", "Dull, lifeless and far too long."]
    response = client.post("/v1/predict/batch", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    assert [p["sentiment"] for p in body["predictions"]] == ["negative", "positive", "negative"]
    assert body["predictions"][0]["confidence"] == body["predictions"][2]["confidence"]
    assert len({p["id"] for p in body["predictions"]}) == 3
    assert body["model_version"] == versions[0]


def test_batch_agrees_with_single_predictions(client: TestClient) -> None:
    texts = ["not bad at all", "an utter bore", "charming", "meh."]
    batch = client.post("/v1/predict/batch", json={"texts": texts}).json()["predictions"]
    single = [client.post("/v1/predict", json={"text": t}).json() for t in texts]
    assert [b["probabilities"]["positive"] for b in batch] == pytest.approx(
        [s["probabilities"]["positive"] for s in single]
    )


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("empty text", "/v1/predict", {"json": {"text": ""}}, 422, "validation_error"),
    ("whitespace text", "/v1/predict", {"json": {"text": " \n\t "}}, 422, "validation_error"),
    ("text too long", "/v1/predict", {"json": {"text": "a" * 5001}}, 422, "validation_error"),
    ("text not a string", "/v1/predict", {"json": {"text": 42}}, 422, "validation_error"),
    ("text missing", "/v1/predict", {"json": {}}, 422, "validation_error"),
    ("unknown field", "/v1/predict", {"json": {"text": "ok", "lang": "en"}}, 422, "validation_error"),
    ("body is a list", "/v1/predict", {"json": ["ok"]}, 422, "validation_error"),
    ("body is null", "/v1/predict", {"content": b"null", "headers": JSON}, 422, "validation_error"),
    ("malformed json", "/v1/predict", {"content": b'{"text": "a', "headers": JSON}, 422, "malformed_json"),
    ("empty body", "/v1/predict", {"content": b"", "headers": JSON}, 422, "validation_error"),
    ("not utf-8", "/v1/predict", {"content": b'{"text": "\xff\xfe"}', "headers": JSON}, 422, "malformed_json"),
    (
        "text/plain",
        "/v1/predict",
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("form", "/v1/predict", {"data": {"text": "hello"}}, 415, "unsupported_media_type"),
    ("no content type", "/v1/predict", {"content": b'{"text": "a"}'}, 415, "unsupported_media_type"),
    ("batch too large", "/v1/predict/batch", {"json": {"texts": ["a"] * 257}}, 422, "validation_error"),
    ("batch empty", "/v1/predict/batch", {"json": {"texts": []}}, 422, "validation_error"),
    ("batch item blank", "/v1/predict/batch", {"json": {"texts": ["fine", "  "]}}, 422, "validation_error"),
    ("batch not a list", "/v1/predict/batch", {"json": {"texts": "abc"}}, 422, "validation_error"),
    ("body over 1 MiB", "/v1/predict", {"json": {"text": "a" * 1_100_000}}, 413, "payload_too_large"),
    ("nul in text", "/v1/predict", {"json": {"text": "fine\x00film"}}, 422, "validation_error"),
    ("nul in batch", "/v1/predict/batch", {"json": {"texts": ["fine", "\x00"]}}, 422, "validation_error"),
    (
        "nested json",
        "/v1/predict",
        {"content": b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": JSON},
        422,
        "malformed_json",
    ),
    (
        "nested batch",
        "/v1/predict/batch",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON},
        422,
        "malformed_json",
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_input_gets_a_clear_json_error(
    client: TestClient, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.text


def test_validation_errors_say_where_without_echoing_the_input(client: TestClient) -> None:
    secret = "do-not-echo-" + "x" * 5000
    error = client.post("/v1/predict", json={"text": secret}).json()["error"]
    assert error["details"][0]["loc"] == ["body", "text"]
    assert "do-not-echo" not in str(error)


def test_nul_in_a_text_is_refused_saying_why_without_echoing_it(client: TestClient) -> None:
    """PostgreSQL text cannot hold U+0000: a text with one is a validation error naming NUL, not echoing the text."""
    error = client.post("/v1/predict", json={"text": "my private review\x00"}).json()["error"]
    assert error["code"] == "validation_error" and error["details"][0]["loc"] == ["body", "text"]
    assert "NUL" in error["details"][0]["msg"] and "my private review" not in str(error)


def test_a_body_that_trickles_past_the_read_timeout_is_408() -> None:
    """A body still arriving ``timeout_seconds`` after the request started gets 408 request_timeout (and
    ``Connection: close``); TestClient sends a body at once, so this drives the middleware over ASGI. Over
    real HTTP: tests/integration/test_gunicorn.py."""
    chunks = [b'{"text": "', b"slow", b'"}']
    sent: list[Message] = []

    async def trickle() -> Message:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    async def reads_everything(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await PlainTextResponse("read")(scope, receive, send)

    app = BodyReadTimeoutMiddleware(reads_everything, timeout_seconds=0.3)
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": []}
    asyncio.run(app(scope, trickle, send))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"

    sent.clear()
    chunks[:] = [b"{}"]
    asyncio.run(app(scope, trickle, send))
    assert sent[0]["status"] == 200  # a body that arrives in time is read as usual


def test_bad_input_leaves_the_worker_serving(client: TestClient) -> None:
    for _, path, kwargs, _, _ in BAD_REQUESTS:
        client.post(path, **kwargs)
    assert client.post("/v1/predict", json={"text": "still here"}).status_code == 200


def test_chunked_body_over_the_cap_is_refused(client: TestClient) -> None:
    # Over real HTTP, tests/integration/test_gunicorn.py shows the refusal comes before the body ends.
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB, no Content-Length
            yield b"a" * 65536
        yield b'"}'

    response = client.post("/v1/predict", content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["details"] == {"max_body_bytes": 1_048_576}


def test_limits_come_from_settings(settings: Settings) -> None:
    tight = settings.model_copy(update={"max_text_chars": 10, "max_batch_size": 2, "max_body_bytes": 200})
    with TestClient(create_app(tight)) as client:
        assert client.post("/v1/predict", json={"text": "a" * 11}).status_code == 422
        assert client.post("/v1/predict", json={"text": "a" * 10}).status_code == 200
        assert client.post("/v1/predict/batch", json={"texts": ["a", "b", "c"]}).status_code == 422
        assert client.post("/v1/predict/batch", json={"texts": ["a" * 10] * 2}).status_code == 200
        assert client.post("/v1/predict", content=b"{" + b" " * 300 + b"}", headers=JSON).status_code == 413
        schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
        assert schema["properties"]["text"]["maxLength"] == 10
