"""The real thing: gunicorn with two uvicorn workers on 127.0.0.1, real HTTP, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from app.ml.registry import ModelRegistry
from tests.integration.services import REPO, Service, start_service

pytestmark = pytest.mark.integration

TEXTS = ["A brilliant, funny and deeply moving film.", "A dull, tedious and boring mess.", "not bad at all", "meh"]


def _predict_many(url: str, n: int, threads: int = 16) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        # A fresh connection each time, so the kernel spreads them over both workers' accept calls.
        return httpx.post(f"{url}/v1/predict", json={"text": TEXTS[i % len(TEXTS)]}, timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def test_two_workers_answer_concurrent_requests(service: Service) -> None:
    responses = _predict_many(service.url, 300)
    assert [r.status_code for r in responses] == [200] * 300
    assert {r.json()["sentiment"] for r in responses[:4]} == {"positive", "negative"}
    served_by = {e["pid"] for e in service.logs() if e.get("event") == "request" and e.get("status") == 200}
    assert len(served_by) == 2


def test_batch_endpoint_over_http(service: Service) -> None:
    response = httpx.post(f"{service.url}/v1/predict/batch", json={"texts": TEXTS * 64}, timeout=30)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 256


def _open_request(url: str, body: bytes, first_part: int) -> socket.socket:
    host = urlparse(url)
    sock = socket.create_connection((host.hostname, host.port), timeout=30)
    sock.sendall(
        b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:first_part])
    )
    return sock


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_sigterm_lets_requests_in_flight_finish_then_exits_cleanly(service: Service) -> None:
    # Two requests are mid-upload when SIGTERM arrives; their bodies complete after it and both are answered.
    body = json.dumps({"texts": TEXTS * 32}).encode()
    sockets = [_open_request(service.url, body, len(body) // 2) for _ in range(2)]
    time.sleep(0.5)
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    for sock in sockets:
        sock.sendall(body[len(body) // 2 :])
    responses = [_read_response(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert service.stop() == 0
    for response in responses:
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert response.count(b'"sentiment"') == 128
    # After the signal the listener is closed: new connections are refused, not half-served.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/healthz", timeout=2)


def test_chunked_body_over_the_cap_is_refused_before_it_ends(service: Service) -> None:
    host = urlparse(service.url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * 65536
        sent = 0
        response = b""
        sock.settimeout(0.05)
        for _ in range(200):  # offers 12.5 MiB; the cap is 1 MiB
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                response += sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if b"\r\n\r\n" in response:
                break
        sock.settimeout(5)
        try:
            while b"}}" not in response:  # the end of the JSON error body
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"payload_too_large"' in response
    assert sent < 4 * 1024 * 1024  # answered long before the 12.5 MiB body was sent
    # The worker that refused it is still serving.
    assert httpx.post(f"{service.url}/v1/predict", json={"text": "still fine"}).status_code == 200


def test_every_worker_serves_a_promoted_version_within_seconds(
    service: Service, store: ModelRegistry, versions: list[str]
) -> None:
    cli = [sys.executable, "-m", "app.cli", "--store", str(store.root)]
    subprocess.run([*cli, "promote", versions[1]], cwd=REPO, check=True, capture_output=True)
    promoted_at = time.monotonic()
    while time.monotonic() - promoted_at < 5:
        seen = {r.json()["model_version"] for r in _predict_many(service.url, 40, 8)}
        if seen == {versions[1]}:
            break
        time.sleep(0.2)
    assert seen == {versions[1]}
    swaps = [e for e in service.logs() if e.get("event") == "model_swapped" and e["model_version"] == versions[1]]
    assert len({e["pid"] for e in swaps}) == 2
    subprocess.run([*cli, "rollback"], cwd=REPO, check=True, capture_output=True)
    time.sleep(2)
    assert {r.json()["model_version"] for r in _predict_many(service.url, 40, 8)} == {versions[0]}


def test_a_tampered_promotion_is_refused_and_workers_keep_serving(
    service: Service, store: ModelRegistry, versions: list[str]
) -> None:
    # Bypass the CLI's own check: write the pointer by hand to a version whose artifact was altered.
    artifact = store.root / versions[1] / "model.joblib"
    artifact.chmod(0o644)
    artifact.write_bytes(artifact.read_bytes()[:-100])
    (store.root / "CURRENT.json").write_text(f'{{"version": "{versions[1]}", "history": ["{versions[0]}"]}}')
    time.sleep(2)
    responses = _predict_many(service.url, 40, 8)
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["model_version"] for r in responses} == {versions[0]}
    assert any(e.get("event") == "model_load_failed" for e in service.logs())


def _connect(url: str) -> socket.socket:
    host = urlparse(url)
    return socket.create_connection((host.hostname, host.port), timeout=10)


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "PUT", "DELETE"])
def test_a_method_the_api_does_not_have_is_json_405_through_the_real_server(service: Service, method: str) -> None:
    """uvicorn's parser passes WebDAV verbs to the app, and the middleware stack lets the router answer them."""
    response = httpx.request(method, f"{service.url}/v1/predict", content=b"\xff", timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST" and "x-request-id" in response.headers


def test_a_trickled_body_gets_408_within_the_timeout_while_other_requests_are_served(
    store: ModelRegistry, tmp_path: Path
) -> None:
    """Headers, then the body at 1 byte/s: 408 request_timeout once the read timeout passed, the connection
    closed; predictions meanwhile answer 200."""
    service = start_service(store, tmp_path / "gunicorn.log", SENTIMENT_BODY_READ_TIMEOUT_SECONDS="2")
    try:
        body = json.dumps({"text": "a slow but fine review"}).encode()
        with _connect(service.url) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            started = time.monotonic()
            sock.settimeout(1)
            response = b""
            for byte in body:
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                assert httpx.post(f"{service.url}/v1/predict", json={"text": "meanwhile"}).status_code == 200
                try:
                    response += sock.recv(65536)
                except TimeoutError:
                    continue
                if b"}}" in response:
                    break
            elapsed = time.monotonic() - started
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert b'"request_timeout"' in response and b"connection: close" in response.lower()
        assert 2 <= elapsed < 5
    finally:
        service.stop()


def test_thousands_of_idle_connections_do_not_stop_predictions_and_are_closed(service: Service) -> None:
    """2,000 connections that never send a byte: a prediction still answers at once, and each idle connection
    is closed after the keep-alive timeout (5 s) instead of holding a worker's descriptors for ever."""
    idle = [_connect(service.url) for _ in range(2000)]
    try:
        started = time.monotonic()
        response = httpx.post(f"{service.url}/v1/predict", json={"text": "still answering"}, timeout=10)
        assert response.status_code == 200 and time.monotonic() - started < 2
        time.sleep(6)
        closed = 0
        for sock in idle[:50]:
            sock.settimeout(5)
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 1
        assert closed == 50
    finally:
        for sock in idle:
            sock.close()


def test_past_the_connection_limit_a_worker_answers_json_503(store: ModelRegistry, tmp_path: Path) -> None:
    """With ``SENTIMENT_WORKER_CONNECTIONS=20`` and 20 connections open, a request gets 503 server_busy at once
    (uvicorn's limit, in the API's error shape); once they close, it is served again."""
    service = start_service(store, tmp_path / "gunicorn.log", workers=1, SENTIMENT_WORKER_CONNECTIONS="20")
    try:
        held = [_connect(service.url) for _ in range(20)]
        time.sleep(0.5)
        busy = httpx.post(f"{service.url}/v1/predict", json={"text": "one too many"}, timeout=10)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
        for sock in held:
            sock.close()
        time.sleep(0.5)
        assert httpx.post(f"{service.url}/v1/predict", json={"text": "served"}, timeout=10).status_code == 200
    finally:
        service.stop()


def test_an_unreadable_secret_file_stops_gunicorn_with_the_setting_named(store: ModelRegistry, tmp_path: Path) -> None:
    """A missing ``SENTIMENT_ADMIN_TOKEN_FILE``: gunicorn refuses to boot and its log names the setting."""
    with pytest.raises(RuntimeError, match="gunicorn exited") as failure:
        start_service(store, tmp_path / "gunicorn.log", SENTIMENT_ADMIN_TOKEN_FILE=str(tmp_path / "absent"))
    assert "gunicorn exited" in str(failure.value)
    events = [json.loads(line) for line in (tmp_path / "gunicorn.log").read_text().splitlines() if line.startswith("{")]
    # the whole log, not the exception's tail: later boot lines may push the event out of that
    refused = [e for e in events if e.get("event") == "secret_unreadable"]
    assert refused and all("SENTIMENT_ADMIN_TOKEN_FILE" in json.dumps(e) for e in refused)
