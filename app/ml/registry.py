"""The versioned model store: immutable version folders, sha256-verified loads, an atomic current pointer.

Layout::

    model_store/
      CURRENT.json                 {"version": ..., "history": [older current versions, newest last]}
      .lock                        fcntl lock serialising pointer and stage changes across processes
      <version>/metadata.json      metrics, data fingerprint, params, libraries, sha256 of artifacts, stage
      <version>/model.joblib       the fitted scikit-learn pipeline
      <version>/reference.json     held-out texts and labels (never seen by any fitted step)
      <version>/report/...         metrics.json, confusion_matrix.png, reliability.png

A version folder is written under a temporary name and renamed into place, so a crash never leaves a
partial version; its artifacts are read-only afterwards. Only ``stage`` in ``metadata.json`` changes
after registration, and ``CURRENT.json`` is replaced with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
from typing import Any, Literal

import joblib
import structlog

from app.errors import ArtifactIntegrityError, ModelStoreError, VersionNotFoundError

log = structlog.get_logger(__name__)

POINTER = "CURRENT.json"
METADATA = "metadata.json"
MODEL_ARTIFACT = "model.joblib"
REFERENCE_ARTIFACT = "reference.json"
"""Held-out texts and labels the model never saw while fitting: drift reference and load-time probes."""
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
    pipeline: Any
    metadata: dict[str, Any]
    path: Path

    def read_json(self, artifact: str) -> Any:
        """An artifact of this version parsed as JSON (verified together with the model at load)."""
        return json.loads((self.path / artifact).read_text())


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
    """File-system model store shared by the trainer, the CLI and every web worker."""

    def __init__(self, root: Path) -> None:
        self.root = root

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
        try:
            pointer = json.loads((self.root / POINTER).read_text())
        except FileNotFoundError:
            return {"version": None, "history": []}
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"{POINTER} is unreadable: {exc}") from exc
        return {"version": pointer.get("version"), "history": list(pointer.get("history", []))}

    def current_version(self) -> str | None:
        """Name of the version the service should serve, or None if nothing was promoted yet."""
        version = self._pointer()["version"]
        return str(version) if version else None

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

    def promote(self, version: str) -> str | None:
        """Make ``version`` current; returns the version it replaced. Rejected versions are refused."""
        with self._locked():
            entry = self.get(version)
            if entry.stage == "rejected":
                raise ModelStoreError(f"{version} was rejected by the promotion gate; it cannot be promoted")
            self.verify(entry)
            pointer = self._pointer()
            previous: str | None = pointer["version"]
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

    # -- loading -----------------------------------------------------------------------------------
    def verify(self, entry: ModelVersion) -> None:
        """Check every artifact's sha256 against the metadata; :class:`ArtifactIntegrityError` if not."""
        hashes = entry.metadata.get("artifacts")
        if not isinstance(hashes, dict) or MODEL_ARTIFACT not in hashes:
            raise ArtifactIntegrityError(f"{entry.version}: metadata lists no artifact hashes")
        for name, expected in hashes.items():
            path = entry.path / name
            try:
                actual = sha256_file(path)
            except OSError as exc:
                raise ArtifactIntegrityError(f"{entry.version}: artifact {name} unreadable ({exc})") from exc
            if actual != expected:
                raise ArtifactIntegrityError(
                    f"{entry.version}: artifact {name} sha256 mismatch",
                    details={"artifact": name, "expected": expected, "actual": actual},
                )

    def load(self, version: str) -> LoadedModel:
        """Verify then unpickle a version. Nothing is unpickled unless every hash matches."""
        entry = self.get(version)
        try:
            self.verify(entry)
        except ArtifactIntegrityError as exc:
            log.error("model_integrity_failed", model_version=version, reason=exc.message)
            raise
        pipeline = joblib.load(entry.path / MODEL_ARTIFACT)
        return LoadedModel(version, pipeline, entry.metadata, entry.path)

    def load_current(self) -> LoadedModel | None:
        """The current version, verified and loaded, or None if nothing was promoted yet."""
        version = self.current_version()
        return self.load(version) if version else None
