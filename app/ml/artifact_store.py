"""Where model artifacts live: immutable, sha256-verified version objects in a folder or an S3-compatible bucket.

One interface, :class:`ArtifactStore`, with one backend per URL scheme (:data:`BACKENDS`), chosen by
``SENTIMENT_MODEL_STORE_URL``:

- ``file:///path`` (the default: ``SENTIMENT_MODEL_STORE``): ``<path>/<version>/<artifact>``, today's layout.
  A version is written in a hidden staging folder and renamed into place, so it is complete once visible.
- ``s3://bucket/prefix``: objects ``<prefix>/<version>/<artifact>``, each uploaded with ``If-None-Match: *``
  (the server refuses to overwrite an existing key) and ``x-amz-checksum-sha256`` (it refuses a body that
  differs from the bytes hashed here); once every artifact is in, ``<prefix>/<version>/.complete.json``
  (the artifacts' sha256 sums) marks the version complete. Endpoint and credentials come from the standard
  AWS variables (:class:`S3Config`); boto3 is imported on first use, so workers on the file backend never
  load it. Downloads are cached on local disk under their sha256 (``SENTIMENT_MODEL_CACHE_DIR``).

Every read is verified: :meth:`ArtifactStore.get_artifact` takes the sha256 the caller recorded and returns
only bytes that hash to it (:class:`ArtifactIntegrityError` otherwise, or when the object is missing).
Cached files are re-hashed on every read rather than trusted by their content-address name: the name says
what the file should hold, not what it holds; the cache is a plain local folder (disk faults, another
process, an operator's copy) and its bytes are unpickled, while hashing costs ~2 ms per MB. A cached file
that fails is dropped and downloaded again.

How the registry will use it (next step; the registry's metadata and current pointer move to PostgreSQL):

- ``register``: write the artifacts to a temporary folder as today, ``hashes = store.put_version(version,
  files)``, then insert the version's row (metadata, these hashes, the signature over them) in one
  transaction. The row is what makes a version exist: ``put_version`` returns only after every artifact and
  the marker are stored, so a row never names a version whose upload did not finish; an upload whose row was
  never written (a crash in between) is garbage for GC.
- ``load``: read the row, check the signature over its hashes, then ``get_artifact(version, name,
  hashes[name])`` for each artifact: the hashes come from the database, never from the object store, so
  whoever can write the bucket but not the database (nor the signing key) cannot make a worker load a model.
  ``model.joblib``'s verified bytes are unpickled as they are.
- GC (a CLI command): ``list_versions(include_incomplete=True)`` minus the versions that have a row, older
  than a grace period, go through ``delete_version``; cache files no version references can be deleted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

import structlog

from app.errors import ArtifactExistsError, ArtifactIntegrityError, ModelStoreError

if TYPE_CHECKING:
    from app.settings import Settings

log = structlog.get_logger(__name__)

COMPLETION_MARKER = ".complete.json"
"""The object that marks an S3 version complete; it lists the artifacts' sha256 sums."""
DEFAULT_REGION = "us-east-1"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PRECONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_version(version: str) -> None:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ModelStoreError(f"invalid model version name {version!r}", details={"version": version})


def _check_artifact(name: str) -> None:
    """Artifact names are relative POSIX paths (``report/metrics.json``); no part may be hidden or ``..``, so
    no name escapes its version or collides with the completion marker."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_PATH_PART.fullmatch(part) for part in parts):
        raise ModelStoreError(f"invalid artifact name {name!r}", details={"artifact": name})


def _check_sha256(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ModelStoreError(f"invalid sha256 {sha256!r}: 64 lower-case hex digits expected")


def _verify(version: str, name: str, expected: str, data: bytes) -> bytes:
    actual = sha256_hex(data)
    if actual != expected:
        raise ArtifactIntegrityError(
            f"{version}: artifact {name} sha256 mismatch",
            details={"artifact": name, "expected": expected, "actual": actual},
        )
    return data


def _read_payloads(files: Mapping[str, Path | bytes]) -> dict[str, bytes]:
    """Each artifact's bytes, read once: what is hashed is what is uploaded."""
    if not files:
        raise ModelStoreError("a version needs at least one artifact")
    payloads = {}
    for name, source in files.items():
        _check_artifact(name)
        payloads[name] = source if isinstance(source, bytes) else Path(source).read_bytes()
    return payloads


class ArtifactStore(ABC):
    """Immutable model versions, each a set of named artifacts, read back only with their sha256.

    Implementations are registered in :data:`BACKENDS` under their URL scheme.
    """

    scheme: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, cache_dir: Path, environ: Mapping[str, str]) -> ArtifactStore:
        """The store a ``<scheme>://`` URL names."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL (no credentials)."""

    @abstractmethod
    def put_version(
        self, version: str, files: Mapping[str, Path | bytes], *, keep_identical: bool = False
    ) -> dict[str, str]:
        """Store every artifact of a new version (a file's path or its bytes) and return their sha256 sums.

        Returns only once the whole version is stored and marked complete. Nothing is ever overwritten: if
        the store already holds any of the version, :class:`ArtifactExistsError` (a failed upload is left
        incomplete, and listed only with ``include_incomplete``). With ``keep_identical`` (a copy resuming
        after an interruption), an artifact already stored with the very same bytes is kept and the rest are
        stored; one stored with other bytes is still :class:`ArtifactExistsError`.
        """

    @abstractmethod
    def get_artifact(self, version: str, name: str, sha256: str) -> bytes:
        """The bytes of artifact ``name`` of ``version``, which hash to ``sha256`` (recorded by the caller).

        :class:`ArtifactIntegrityError` if the artifact is missing or its bytes hash differently;
        :class:`ModelStoreError` if the store cannot be reached.
        """

    @abstractmethod
    def list_versions(self, *, include_incomplete: bool = False) -> list[str]:
        """The stored versions' names, sorted; with ``include_incomplete``, also uploads that never finished."""

    @abstractmethod
    def delete_version(self, version: str) -> None:
        """Remove a version and all its artifacts (tests and garbage collection only); absent: nothing to do."""


# -- a folder ------------------------------------------------------------------------------------------------


class FileArtifactStore(ArtifactStore):
    """Versions as folders of read-only files: ``<root>/<version>/<artifact>`` (the registry's layout)."""

    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_url(cls, url: str, cache_dir: Path, environ: Mapping[str, str]) -> FileArtifactStore:
        parts = urlsplit(url)
        if parts.netloc not in {"", "localhost"} or not parts.path.startswith("/"):
            raise ModelStoreError(f"a file store URL names an absolute local path (file:///path), not {url!r}")
        return cls(Path(unquote(parts.path)))

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def put_version(
        self, version: str, files: Mapping[str, Path | bytes], *, keep_identical: bool = False
    ) -> dict[str, str]:
        _check_version(version)
        payloads = _read_payloads(files)
        final = self.root / version
        if final.exists():
            # A version appears whole, by rename: kept only if it holds exactly these bytes.
            if keep_identical and all(self._holds(version, name, data) for name, data in payloads.items()):
                return {name: sha256_hex(data) for name, data in payloads.items()}
            raise ArtifactExistsError(f"{self.url}: version {version} exists; versions are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        # The registry's staging prefix: its pruning removes what a killed writer leaves behind.
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{version}-"))
        try:
            hashes = {}
            for name, data in payloads.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(0o444)
                hashes[name] = sha256_hex(data)
            staging.chmod(0o755)
            try:
                staging.rename(final)
            except OSError as exc:  # another writer renamed the same version into place meanwhile
                raise ArtifactExistsError(f"{self.url}: version {version} exists; versions are immutable") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("artifacts_stored", model_version=version, artifacts=len(hashes), store=self.url)
        return hashes

    def _holds(self, version: str, name: str, data: bytes) -> bool:
        try:
            return sha256_hex((self.root / version / name).read_bytes()) == sha256_hex(data)
        except OSError:
            return False

    def get_artifact(self, version: str, name: str, sha256: str) -> bytes:
        _check_version(version)
        _check_artifact(name)
        _check_sha256(sha256)
        try:
            data = (self.root / version / name).read_bytes()
        except OSError as exc:
            raise ArtifactIntegrityError(
                f"{version}: artifact {name} unreadable in {self.url} ({exc.strerror})",
                details={"artifact": name, "version": version},
            ) from exc
        return _verify(version, name, sha256, data)

    def list_versions(self, *, include_incomplete: bool = False) -> list[str]:
        # Versions appear by rename, complete; staging folders are hidden and belong to no version yet.
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))

    def delete_version(self, version: str) -> None:
        _check_version(version)
        shutil.rmtree(self.root / version, ignore_errors=True)
        log.info("artifacts_deleted", model_version=version, store=self.url)


# -- an S3-compatible object store ---------------------------------------------------------------------------


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    """``name`` from the environment or, failing that, the file ``<name>_FILE`` names (boto3 reads no
    ``_FILE`` variables), stripped; blank: unset."""
    value = environ.get(name, "").strip()
    if value:
        return value
    path = environ.get(f"{name}_FILE", "").strip()
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelStoreError(f"{name}_FILE={path} is unreadable: {exc}") from None


@dataclass(frozen=True)
class S3Config:
    """How to reach the object store, from the standard AWS variables.

    Without keys, boto3's own chain applies (a web identity, an instance or task role, ``~/.aws``).
    """

    endpoint_url: str | None = None
    region: str = DEFAULT_REGION
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> S3Config:
        """``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``,
        default ``us-east-1``), ``AWS_ACCESS_KEY_ID[_FILE]``, ``AWS_SECRET_ACCESS_KEY[_FILE]`` and
        ``AWS_SESSION_TOKEN``. :class:`ModelStoreError` for one key without the other."""
        access_key = _variable(environ, "AWS_ACCESS_KEY_ID")
        secret_key = _variable(environ, "AWS_SECRET_ACCESS_KEY")
        if (access_key is None) != (secret_key is None):
            raise ModelStoreError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither)")
        endpoint = (environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or "").strip()
        region = (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "").strip()
        return cls(
            endpoint_url=endpoint or None,
            region=region or DEFAULT_REGION,
            access_key_id=access_key,
            secret_access_key=secret_key,
            session_token=environ.get("AWS_SESSION_TOKEN", "").strip() or None,
        )


class ContentCache:
    """Artifacts on local disk, one read-only file per sha256 (``<root>/<sha[:2]>/<sha>``), written atomically
    so concurrent processes sharing the folder never see a partial file. Every read re-hashes the file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes hashing to ``sha256``, or None (absent, unreadable, or corrupt: then removed)."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if sha256_hex(data) != sha256:
            log.warning("artifact_cache_corrupt", sha256=sha256, path=str(path))
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Cache ``data`` (already verified to hash to ``sha256``); a cache that cannot be written is logged
        and skipped, since the bytes are in hand."""
        path = self.path(sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sha256[:16]}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                Path(tmp).chmod(0o444)
                Path(tmp).replace(path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("artifact_cache_write_failed", sha256=sha256, error=str(exc))


class S3ArtifactStore(ArtifactStore):
    """Versions as objects ``<prefix>/<version>/<artifact>`` in one bucket of an S3-compatible store."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, config: S3Config | None = None) -> None:
        if not bucket:
            raise ModelStoreError("an s3:// store URL names a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = ContentCache(cache_dir)
        self.config = config or S3Config()
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, cache_dir: Path, environ: Mapping[str, str]) -> S3ArtifactStore:
        parts = urlsplit(url)
        return cls(parts.netloc, unquote(parts.path), cache_dir, S3Config.from_environ(environ))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created (and boto3 imported) on first use; boto3 clients are thread-safe."""
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = self.config
                options: dict[str, Any] = {
                    "connect_timeout": 5,
                    "read_timeout": 60,
                    "retries": {"mode": "standard", "max_attempts": 3},
                }
                if config.endpoint_url:  # S3-compatible servers answer on one host name: path-style keys
                    options["s3"] = {"addressing_style": "path"}
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=config.endpoint_url,
                    region_name=config.region,
                    aws_access_key_id=config.access_key_id,
                    aws_secret_access_key=config.secret_access_key,
                    aws_session_token=config.session_token,
                    config=Config(**options),
                )
            return self._client

    def _key(self, version: str, name: str = "") -> str:
        return "/".join(part for part in (self.prefix, version, name) if part)

    def _error(self, exc: Exception, action: str) -> ModelStoreError:
        code = _error_code(exc)
        return ModelStoreError(
            f"{self.url}: {action} failed ({code or type(exc).__name__}: {exc})",
            details={"store": self.url, "code": code},
        )

    def _put_new(self, key: str, data: bytes, sha256: str, content_type: str) -> None:
        """Create ``key``; :class:`ArtifactExistsError` if it exists (the server checks, atomically)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                ContentType=content_type,
                Metadata={"sha256": sha256},
            )
        except ClientError as exc:
            if _error_code(exc) in _PRECONDITION_FAILED:
                raise ArtifactExistsError(
                    f"s3://{self.bucket}/{key} exists: versions are immutable, store a new version instead",
                    details={"key": key},
                ) from exc
            raise self._error(exc, f"upload of {key}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"upload of {key}") from exc

    def put_version(
        self, version: str, files: Mapping[str, Path | bytes], *, keep_identical: bool = False
    ) -> dict[str, str]:
        _check_version(version)
        payloads = _read_payloads(files)
        hashes = {name: sha256_hex(data) for name, data in payloads.items()}
        for name, data in payloads.items():
            try:
                self._put_new(self._key(version, name), data, hashes[name], "application/octet-stream")
            except ArtifactExistsError:
                if not (keep_identical and self._stored_sha256(version, name) == hashes[name]):
                    raise
        marker = {"version": version, "artifacts": hashes, "completed_at": datetime.now(UTC).isoformat()}
        body = json.dumps(marker, indent=2, sort_keys=True).encode()
        try:
            self._put_new(self._key(version, COMPLETION_MARKER), body, sha256_hex(body), "application/json")
        except ArtifactExistsError:
            if not (keep_identical and self._marked(version) == hashes):
                raise
        log.info("artifacts_stored", model_version=version, artifacts=len(hashes), store=self.url)
        return hashes

    def _stored_sha256(self, version: str, name: str) -> str | None:
        """The sha256 of the stored object's bytes, downloaded (never the cache: it says what the store should
        hold), or None if it is missing."""
        try:
            return sha256_hex(self._download(version, name))
        except ArtifactIntegrityError:
            return None

    def _marked(self, version: str) -> Any:
        """The artifacts' sha256 sums the version's completion marker lists (None: no readable marker)."""
        try:
            return json.loads(self._download(version, COMPLETION_MARKER)).get("artifacts")
        except (ArtifactIntegrityError, ValueError, AttributeError):
            return None

    def get_artifact(self, version: str, name: str, sha256: str) -> bytes:
        _check_version(version)
        _check_artifact(name)
        _check_sha256(sha256)
        cached = self.cache.get(sha256)
        if cached is not None:
            return cached
        data = _verify(version, name, sha256, self._download(version, name))
        self.cache.put(sha256, data)
        return data

    def _download(self, version: str, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(version, name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise ArtifactIntegrityError(
                    f"{version}: artifact {name} is missing from {self.url}",
                    details={"artifact": name, "version": version, "key": key},
                ) from exc
            raise self._error(exc, f"download of {key}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"download of {key}") from exc
        return data

    def _keys(self, prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"listing {prefix or '/'}") from exc

    def list_versions(self, *, include_incomplete: bool = False) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        seen: dict[str, bool] = {}
        for key in self._keys(root):
            version, _, rest = key[len(root) :].partition("/")
            if _VERSION.fullmatch(version) and rest:
                seen[version] = seen.get(version, False) or rest == COMPLETION_MARKER
        return sorted(v for v, complete in seen.items() if complete or include_incomplete)

    def delete_version(self, version: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_version(version)
        marker = self._key(version, COMPLETION_MARKER)
        keys = [key for key in self._keys(self._key(version) + "/") if key != marker]
        try:
            # The marker first: readers listing versions stop seeing it before its artifacts go.
            self.client.delete_object(Bucket=self.bucket, Key=marker)
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                result = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if result.get("Errors"):
                    raise ModelStoreError(f"{self.url}: deleting {version} failed", details=result["Errors"])
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"deleting {version}") from exc
        log.info("artifacts_deleted", model_version=version, store=self.url, objects=len(keys) + 1)


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


# -- choosing a backend --------------------------------------------------------------------------------------

BACKENDS: dict[str, type[ArtifactStore]] = {backend.scheme: backend for backend in (FileArtifactStore, S3ArtifactStore)}
"""Every artifact store backend, by the URL scheme it serves."""


def open_artifact_store(url: str, cache_dir: Path, environ: Mapping[str, str] | None = None) -> ArtifactStore:
    """The store ``url`` names (``file:///path`` or ``s3://bucket/prefix``); ``environ`` (default: this
    process's) supplies an object store's endpoint and credentials. :class:`ModelStoreError` for an
    unknown scheme."""
    scheme = urlsplit(url).scheme
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise ModelStoreError(f"unsupported model store URL {url!r}: use one of {', '.join(sorted(BACKENDS))}://")
    return backend.from_url(url, cache_dir, os.environ if environ is None else environ)


def artifact_store_from_settings(settings: Settings) -> ArtifactStore:
    """The store of ``SENTIMENT_MODEL_STORE_URL`` (default: the ``SENTIMENT_MODEL_STORE`` folder), caching
    downloads in ``SENTIMENT_MODEL_CACHE_DIR`` (default ``<state_dir>/model-cache``)."""
    url = settings.model_store_url or settings.model_store.resolve().as_uri()
    return open_artifact_store(url, settings.model_cache_dir or settings.state_dir / "model-cache")
