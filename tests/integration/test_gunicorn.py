"""The real thing: gunicorn with two uvicorn workers on 127.0.0.1, real HTTP, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from app.ml.registry import ModelRegistry
from tests.integration.services import REPO, Service

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
