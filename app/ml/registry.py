"""The versioned model store: immutable version folders, sha256-verified loads, an atomic current pointer.

Layout::

    model_store/
      CURRENT.json                 {"version": ..., "history": [older current versions, newest last]}
      .lock                        fcntl lock serialising pointer and stage changes across processes
      <version>/metadata.json      metrics, data fingerprint, model kind, params, libraries, sha256 of
                                   artifacts, stage, and (with a signing key) an HMAC of the hashes
      <version>/model.joblib       the fitted model (a :class:`app.ml.model.SentimentModel`, saved by itself)
      <version>/reference.json     held-out texts and labels (never seen by any fitted step)
      <version>/report/...         metrics.json, confusion_matrix.png, reliability.png

A version folder is written under a temporary name and renamed into place, so a crash never leaves a
partial version; its artifacts are read-only afterwards. Only ``stage`` in ``metadata.json`` changes
after registration, and ``CURRENT.json`` is replaced with ``os.replace``. Loading returns a
:class:`SentimentModel` whatever its kind; the store never looks inside it.

Loads unpickle the very bytes whose sha256 was checked (read once into memory), so a file swapped after
the check is never unpickled; :meth:`LoadedModel.artifact_bytes` serves the other artifacts the same way.
With a signing key (``SENTIMENT_MODEL_SIGNING_KEY[_FILE]``, kept outside the store), ``metadata.json``
carries an HMAC-SHA256 over the version name and the artifact hashes: whoever can write the store but
not read the key cannot make a version the service loads. Loading and the watcher only read the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from app.errors import (
    ArtifactIntegrityError,
    CurrentVersionChangedError,
    ModelSignatureError,
    ModelStoreError,
    VersionNotFoundError,
)
from app.ml.model import SentimentModel, load_model

if TYPE_CHECKING:
    from app.settings import Settings

log = structlog.get_logger(__name__)

POINTER = "CURRENT.json"
METADATA = "metadata.json"
MODEL_ARTIFACT = "model.joblib"
REFERENCE_ARTIFACT = "reference.json"
"""Held-out texts and labels the model never saw while fitting: drift reference and load-time probes."""
SIGNATURE = "signature"
"""The ``metadata.json`` key of a version's signature: ``{"algorithm": "hmac-sha256", "hmac": hex}``."""
SIGNING_ALGORITHM = "hmac-sha256"
Stage = Literal["candidate", "production", "archived", "rejected"]

ArtifactWriter = Callable[[Path], None]
"""Writes one artifact to the path it is given."""


@dataclass(frozen=True)
class ModelVersion:
    """A registered version: its name, folder and metadata (as read from ``metadata.json``)."""

    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.metadata.get("stage", "candidate"))


@dataclass(frozen=True)
class LoadedModel:
    """A verified, deserialised version ready to predict."""

    version: str
    model: SentimentModel
    metadata: dict[str, Any]
    path: Path

    def artifact_bytes(self, name: str) -> bytes:
        """The bytes of artifact ``name``, read once and checked against the sha256 in this version's
        metadata (verified, and its signature checked, at load); :class:`ArtifactIntegrityError` if not."""
        return _read_verified(self.path, self.version, self.metadata.get("artifacts", {}), name)

    def read_json(self, artifact: str) -> Any:
        """An artifact of this version parsed as JSON, from verified bytes (:meth:`artifact_bytes`)."""
        return json.loads(self.artifact_bytes(artifact))


def _check_hash(version: str, name: str, expected: Any, actual: str) -> None:
    if actual != expected:
        raise ArtifactIntegrityError(
            f"{version}: artifact {name} sha256 mismatch",
            details={"artifact": name, "expected": expected, "actual": actual},
        )


def _read_verified(folder: Path, version: str, hashes: Mapping[str, Any], name: str) -> bytes:
    """Artifact ``name`` of a version folder, read once; its bytes are returned only if their sha256 is
    the one ``hashes`` records."""
    if name not in hashes:
        raise ArtifactIntegrityError(f"{version}: {name} is not a recorded artifact", details={"artifact": name})
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        raise ArtifactIntegrityError(f"{version}: artifact {name} unreadable ({exc})") from exc
    _check_hash(version, name, hashes[name], hashlib.sha256(data).hexdigest())
    return data


def signing_payload(version: str, hashes: Mapping[str, str]) -> bytes:
    """What a signature covers: canonical JSON of the version name and every artifact's sha256 (the name
    is included so a signature copied to another version's folder does not verify there)."""
    return json.dumps({"artifacts": dict(hashes), "version": version}, sort_keys=True, separators=(",", ":")).encode()


def signature(key: bytes, version: str, hashes: Mapping[str, str]) -> dict[str, str]:
    """The ``signature`` block of a version's metadata: HMAC-SHA256 of :func:`signing_payload`."""
    digest = hmac.new(key, signing_payload(version, hashes), hashlib.sha256).hexdigest()
    return {"algorithm": SIGNING_ALGORITHM, "hmac": digest}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes it 0600: readers may be another user
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_version_name(now: datetime | None = None) -> str:
    """Sortable, collision-safe version name: ``v20261127T024415Z-3f9a1c``."""
    now = now or datetime.now(UTC)
    return f"v{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


class ModelRegistry:
    """File-system model store shared by the trainer, the CLI and every web worker.

    With ``signing_key``, registration signs versions and only versions whose signature verifies are
    loaded or promoted; without it, signatures are neither written nor checked.
    """

    def __init__(self, root: Path, signing_key: bytes | None = None) -> None:
        self.root = root
        self._signing_key = signing_key

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The store at ``SENTIMENT_MODEL_STORE`` with the key of ``SENTIMENT_MODEL_SIGNING_KEY[_FILE]``.

        :class:`ModelStoreError` if the key is configured but blank, or its file lies inside the store
        (whoever can write the store must not be able to read the key).
        """
        key_file = settings.model_signing_key_file
        if key_file is not None and key_file.resolve().is_relative_to(settings.model_store.resolve()):
            raise ModelStoreError(f"the model signing key file {key_file} must be kept outside the model store")
        key = settings.secret("model_signing_key")
        if key is None and (settings.model_signing_key is not None or key_file is not None):
            # A blank key must not quietly turn signing off where an operator asked for it.
            raise ModelStoreError("the model signing key is configured but blank")
        return cls(settings.model_store, key.encode() if key else None)

    @property
    def signing(self) -> bool:
        """True if versions are signed and only signed versions are loaded."""
        return self._signing_key is not None

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------------
    def _version_dir(self, version: str) -> Path:
        # Version names come from clients (CLI, API): refuse anything that is not a plain folder name.
        if not version or version != Path(version).name or version.startswith("."):
            raise VersionNotFoundError(f"no model version {version!r}", details={"version": version})
        return self.root / version

    def get(self, version: str) -> ModelVersion:
        """The version's metadata; :class:`VersionNotFoundError` if it is not registered."""
        path = self._version_dir(version)
        try:
            metadata = json.loads((path / METADATA).read_text())
        except FileNotFoundError:
            raise VersionNotFoundError(f"no model version {version!r}", details={"version": version}) from None
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"metadata of {version!r} is unreadable: {exc}") from exc
        return ModelVersion(version, path, metadata)

    def versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first (names sort by creation time)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.name.startswith(".") and (path / METADATA).is_file():
                with contextlib.suppress(ModelStoreError):
                    found.append(self.get(path.name))
        return found

    def _pointer(self) -> dict[str, Any]:
        """``CURRENT.json`` as ``{"version": str | None, "history": [str, ...]}``; :class:`ModelStoreError`
        if it is unreadable, not JSON or not of that shape."""
        try:
            pointer = json.loads((self.root / POINTER).read_text())
        except FileNotFoundError:
            return {"version": None, "history": []}
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"{POINTER} is unreadable: {exc}") from exc
        if not isinstance(pointer, dict):
            raise ModelStoreError(f"{POINTER} holds a JSON {type(pointer).__name__}, not an object")
        version, history = pointer.get("version"), pointer.get("history", [])
        if not isinstance(version, str | None) or not (
            isinstance(history, list) and all(isinstance(v, str) for v in history)
        ):
            raise ModelStoreError(f"{POINTER} is malformed: version must be a string, history a list of them")
        return {"version": version or None, "history": list(history)}

    def current_version(self) -> str | None:
        """Name of the version the service should serve, or None if nothing was promoted yet.

        :class:`ModelStoreError` if ``CURRENT.json`` is unreadable, malformed or names no registered version.
        """
        version: str | None = self._pointer()["version"]
        if version is None:
            return None
        try:
            if (self._version_dir(version) / METADATA).is_file():
                return version
        except VersionNotFoundError:
            pass
        raise ModelStoreError(f"{POINTER} names {version!r}, which is not a registered version")

    # -- writing -----------------------------------------------------------------------------------
    def register(
        self,
        artifacts: Mapping[str, ArtifactWriter],
        metadata: Mapping[str, Any],
        stage: Stage = "candidate",
        version: str | None = None,
    ) -> ModelVersion:
        """Write a new immutable version and return it.

        Each artifact writer fills one file in a temporary folder; their sha256 sums go into
        ``metadata.json`` and the folder is renamed into place in one step.
        """
        if MODEL_ARTIFACT not in artifacts:
            raise ModelStoreError(f"a version needs a {MODEL_ARTIFACT} artifact")
        version = version or new_version_name()
        final = self._version_dir(version)
        self.root.mkdir(parents=True, exist_ok=True)
        self._prune_staging()
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{version}-"))
        try:
            hashes: dict[str, str] = {}
            for name, write in artifacts.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                hashes[name] = sha256_file(target)
                target.chmod(0o444)
            record = {
                **metadata,
                "version": version,
                "stage": stage,
                "created_at": datetime.now(UTC).isoformat(),
                "artifacts": hashes,
            }
            if self._signing_key is not None:
                record[SIGNATURE] = signature(self._signing_key, version, hashes)
            _write_json_atomic(staging / METADATA, record)
            staging.chmod(0o755)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model_registered", model_version=version, stage=stage)
        return ModelVersion(version, final, record)

    def _prune_staging(self, older_than_seconds: float = 3600.0) -> None:
        """Remove staging folders a killed writer left behind (never versions: they were not renamed)."""
        cutoff = time.time() - older_than_seconds
        for path in self.root.glob(".staging-*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path)
                    log.info("staging_pruned", path=path.name)

    def _set_stage(self, version: str, stage: Stage) -> None:
        entry = self.get(version)
        _write_json_atomic(entry.path / METADATA, {**entry.metadata, "stage": stage})

    def promote(self, version: str, expected_current: str | None = None) -> str | None:
        """Make ``version`` current; returns the version it replaced. Rejected versions are refused.

        With ``expected_current`` (a retrain passes the version it improved on), the promotion happens only
        if that version is still current, checked under the store's lock: otherwise an operator promoted
        or rolled back meanwhile and :class:`CurrentVersionChangedError` leaves their choice in place.
        """
        with self._locked():
            entry = self.get(version)
            if entry.stage == "rejected":
                raise ModelStoreError(f"{version} was rejected by the promotion gate; it cannot be promoted")
            self.verify(entry)
            pointer = self._pointer()
            previous: str | None = pointer["version"]
            if expected_current is not None and previous != expected_current:
                raise CurrentVersionChangedError(
                    f"{version} was not promoted: it expected {expected_current} to be current, but {previous} is",
                    details={"reason": "parent_not_current", "expected": expected_current, "current": previous},
                )
            if previous == version:
                return previous
            history = [*pointer["history"], previous] if previous else pointer["history"]
            _write_json_atomic(self.root / POINTER, {"version": version, "history": history})
            self._set_stage(version, "production")
            if previous:
                with contextlib.suppress(VersionNotFoundError):
                    self._set_stage(previous, "archived")
        log.info("model_promoted", model_version=version, previous_version=previous)
        return previous

    def rollback(self) -> str:
        """Make the previously current version current again; returns it."""
        with self._locked():
            pointer = self._pointer()
            history = pointer["history"]
            if not history:
                raise ModelStoreError("nothing to roll back to: no earlier version was ever current")
            target = history[-1]
            self.verify(self.get(target))
            _write_json_atomic(self.root / POINTER, {"version": target, "history": history[:-1]})
            self._set_stage(target, "production")
            if pointer["version"]:
                with contextlib.suppress(VersionNotFoundError):
                    self._set_stage(pointer["version"], "archived")
        log.info("model_rolled_back", model_version=target, previous_version=pointer["version"])
        return str(target)

    def sign(self, version: str) -> None:
        """(Re-)sign ``version`` with the configured key, after checking its artifacts against its hashes.

        For adopting signing on an existing store: sign only a store you trust, since the hashes it signs
        are the ones ``metadata.json`` holds now. :class:`ModelStoreError` without a key.
        """
        if self._signing_key is None:
            raise ModelStoreError("no signing key: set SENTIMENT_MODEL_SIGNING_KEY or SENTIMENT_MODEL_SIGNING_KEY_FILE")
        with self._locked():
            entry = self.get(version)
            hashes = self._verify_hashes(entry)
            record = {**entry.metadata, SIGNATURE: signature(self._signing_key, version, hashes)}
            _write_json_atomic(entry.path / METADATA, record)
        log.info("model_signed", model_version=version)

    # -- loading -----------------------------------------------------------------------------------
    def _check_signature(self, entry: ModelVersion, hashes: Mapping[str, str]) -> None:
        if self._signing_key is None:
            return
        recorded = entry.metadata.get(SIGNATURE)
        expected = signature(self._signing_key, entry.version, hashes)
        if not isinstance(recorded, dict) or recorded.get("algorithm") != SIGNING_ALGORITHM:
            raise ModelSignatureError(f"{entry.version}: not signed (a signing key is configured)")
        if not hmac.compare_digest(str(recorded.get("hmac", "")), expected["hmac"]):
            raise ModelSignatureError(f"{entry.version}: the signature does not verify with the configured key")

    def _recorded_hashes(self, entry: ModelVersion) -> dict[str, str]:
        hashes = entry.metadata.get("artifacts")
        if not isinstance(hashes, dict) or MODEL_ARTIFACT not in hashes:
            raise ArtifactIntegrityError(f"{entry.version}: metadata lists no artifact hashes")
        return hashes

    def _verify_hashes(self, entry: ModelVersion, skip: frozenset[str] = frozenset()) -> dict[str, str]:
        """Every artifact's sha256 (but ``skip``'s) checked against the metadata; returns the hashes."""
        hashes = self._recorded_hashes(entry)
        for name, expected in hashes.items():
            if name in skip:
                continue
            try:
                actual = sha256_file(entry.path / name)
            except OSError as exc:
                raise ArtifactIntegrityError(f"{entry.version}: artifact {name} unreadable ({exc})") from exc
            _check_hash(entry.version, name, expected, actual)
        return hashes

    def verify(self, entry: ModelVersion) -> None:
        """Check the signature (with a signing key) and every artifact's sha256 against the metadata.

        :class:`ModelSignatureError` for a missing or wrong signature, :class:`ArtifactIntegrityError`
        for a missing or changed artifact.
        """
        self._check_signature(entry, self._recorded_hashes(entry))
        self._verify_hashes(entry)

    def load(self, version: str) -> LoadedModel:
        """Verify then unpickle a version. Nothing is unpickled unless the signature (with a signing key)
        and every hash match; the model is unpickled from the bytes that were hashed, read once.

        The model must be of the kind its metadata records (``model.kind``; versions saved before kinds
        were recorded hold the default kind). Failures are logged as ``model_signature_invalid`` or
        ``model_integrity_failed``.
        """
        entry = self.get(version)
        try:
            hashes = self._recorded_hashes(entry)
            self._check_signature(entry, hashes)
            self._verify_hashes(entry, skip=frozenset({MODEL_ARTIFACT}))
            data = _read_verified(entry.path, version, hashes, MODEL_ARTIFACT)
        except ArtifactIntegrityError as exc:
            event = "model_signature_invalid" if isinstance(exc, ModelSignatureError) else "model_integrity_failed"
            log.error(event, model_version=version, reason=exc.message)
            raise
        model = load_model(io.BytesIO(data), entry.metadata.get("params"))
        recorded = entry.metadata.get("model", {}).get("kind", model.kind)
        if recorded != model.kind:
            raise ModelStoreError(f"{version}: model.joblib holds a {model.kind!r} model, metadata says {recorded!r}")
        return LoadedModel(version, model, entry.metadata, entry.path)

    def load_current(self) -> LoadedModel | None:
        """The current version, verified and loaded, or None if nothing was promoted yet."""
        version = self.current_version()
        return self.load(version) if version else None
