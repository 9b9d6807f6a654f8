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

Where versions live is a backend (:class:`RegistryBackend`, one per kind in :data:`BACKENDS`), chosen by
:meth:`ModelRegistry.from_settings`: :class:`FolderBackend` (the layout above, the default) or, with
``SENTIMENT_MODEL_STORE_URL=s3://bucket/prefix``, :class:`app.ml.registry_db.DatabaseBackend`: versions'
rows and the current pointer in the service's SQL database (``SENTIMENT_DATABASE_URL``), the artifacts in
an :class:`app.ml.artifact_store.ArtifactStore`. The registry itself (signatures, verification, the
promotion rules, unpickling) is the same over both.
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
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

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
    from app.ml.artifact_store import ArtifactStore
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
    """A registered version: its name, folder (None outside a folder store) and metadata."""

    version: str
    path: Path | None
    metadata: dict[str, Any]
    location: str = ""
    """Where its artifacts are, for people: the folder, or the object store URL of the version."""

    @property
    def stage(self) -> str:
        return str(self.metadata.get("stage", "candidate"))


@dataclass(frozen=True)
class LoadedModel:
    """A verified, deserialised version ready to predict."""

    version: str
    model: SentimentModel
    metadata: dict[str, Any]
    path: Path | None
    artifacts: ArtifactStore | None = field(default=None, repr=False, compare=False)
    """The object store holding the version's artifacts (None: they are in the folder ``path``)."""

    def artifact_bytes(self, name: str) -> bytes:
        """The bytes of artifact ``name``, read once and checked against the sha256 in this version's
        metadata (verified, and its signature checked, at load); :class:`ArtifactIntegrityError` if not."""
        hashes = self.metadata.get("artifacts", {})
        if self.artifacts is None:
            if self.path is None:
                raise ModelStoreError(f"{self.version}: loaded without a folder or an artifact store")
            return _read_verified(self.path, self.version, hashes, name)
        if name not in hashes:
            raise ArtifactIntegrityError(
                f"{self.version}: {name} is not a recorded artifact", details={"artifact": name}
            )
        return self.artifacts.get_artifact(self.version, name, str(hashes[name]))

    def read_json(self, artifact: str) -> Any:
        """An artifact of this version parsed as JSON, from verified bytes (:meth:`artifact_bytes`)."""
        return json.loads(self.artifact_bytes(artifact))


@dataclass(frozen=True)
class Pointer:
    """The current version (None: nothing promoted yet) and the earlier current ones, newest last."""

    version: str | None
    history: list[str]


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


def parse_pointer(pointer: Any, source: str) -> Pointer:
    """A stored pointer (``{"version": str | None, "history": [str, ...]}``) checked for shape;
    :class:`ModelStoreError` naming ``source`` if it is not of that shape."""
    if not isinstance(pointer, dict):
        raise ModelStoreError(f"{source} holds a JSON {type(pointer).__name__}, not an object")
    version, history = pointer.get("version"), pointer.get("history", [])
    if not isinstance(version, str | None) or not (
        isinstance(history, list) and all(isinstance(v, str) for v in history)
    ):
        raise ModelStoreError(f"{source} is malformed: version must be a string, history a list of them")
    return Pointer(version or None, list(history))


# -- backends: where versions, their artifacts and the pointer live ---------------------------------------


class RegistryChange(ABC):
    """Reads and writes inside one of the backend's serialised changes (:meth:`RegistryBackend.change`)."""

    @abstractmethod
    def get(self, version: str) -> ModelVersion:
        """The version as it stands inside this change."""

    @abstractmethod
    def pointer(self) -> Pointer:
        """The current pointer inside this change."""

    @abstractmethod
    def set_pointer(self, pointer: Pointer) -> None:
        """Replace the current pointer."""

    @abstractmethod
    def set_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        """Replace a version's metadata (only ``stage`` and ``signature`` change after registration)."""


class RegistryBackend(ABC):
    """Where a registry keeps versions' metadata, their artifacts and the current pointer.

    The registry decides (signatures, the promotion rules, what is unpickled); a backend stores. Backends
    are listed in :data:`BACKENDS`.
    """

    kind: str

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for people and logs (a folder, or the database and object store)."""

    @property
    def root(self) -> Path | None:
        """The store's folder, if it is one."""
        return None

    @property
    def artifact_store(self) -> ArtifactStore | None:
        """The object store a loaded version reads its artifacts from (None: from its folder)."""
        return None

    @abstractmethod
    def get(self, version: str) -> ModelVersion:
        """The version's metadata; :class:`VersionNotFoundError` if it is not registered."""

    @abstractmethod
    def versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first."""

    @abstractmethod
    def pointer(self) -> Pointer:
        """The current pointer; :class:`ModelStoreError` if it cannot be read."""

    @abstractmethod
    def is_registered(self, version: str) -> bool:
        """True if ``version`` is a registered version."""

    @abstractmethod
    def create(
        self, version: str, artifacts: Mapping[str, ArtifactWriter], record: Callable[[dict[str, str]], dict[str, Any]]
    ) -> ModelVersion:
        """Store a new version: write its artifacts, then its metadata, ``record(artifact sha256 sums)``.

        The version exists (is listed, can be loaded) only once all of it is stored.
        """

    def import_version(self, metadata: Mapping[str, Any], artifacts: Mapping[str, bytes]) -> ModelVersion:
        """Store a version copied from another store as it was there: ``metadata`` verbatim (its name,
        ``created_at``, stage, artifacts' sha256 sums, signature) with these artifacts' bytes, which must hash
        to the sums it records (:class:`ArtifactIntegrityError` otherwise). The version must not be registered.

        Like :meth:`create`, the version exists only once all of it is stored; a backend whose artifacts can be
        left behind by an interrupted copy keeps the identical ones when the copy runs again.
        """
        return self.create(
            str(metadata["version"]),
            {name: _writing(data) for name, data in artifacts.items()},
            lambda hashes: verbatim_card(metadata, hashes),
        )

    @abstractmethod
    def read_artifact(self, entry: ModelVersion, name: str, hashes: Mapping[str, str]) -> bytes:
        """Artifact ``name``'s bytes, read once, returned only if they hash to ``hashes[name]``."""

    def check_artifact(self, entry: ModelVersion, name: str, expected: str) -> None:
        """:class:`ArtifactIntegrityError` unless artifact ``name`` hashes to ``expected``."""
        self.read_artifact(entry, name, {name: expected})

    @abstractmethod
    def change(self) -> contextlib.AbstractContextManager[RegistryChange]:
        """A change of the pointer or of stages, serialised with every other (a lock, a transaction)."""

    def close(self) -> None:
        """Release what the backend holds open (connections)."""
        return None


def _writing(data: bytes) -> ArtifactWriter:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def verbatim_card(metadata: Mapping[str, Any], stored: Mapping[str, str]) -> dict[str, Any]:
    """An imported version's metadata, unchanged, once the sha256 sums of what was stored (``stored``) are
    the ones it records; :class:`ArtifactIntegrityError` if they differ."""
    version = str(metadata.get("version"))
    recorded = metadata.get("artifacts")
    if not isinstance(recorded, dict) or set(recorded) != set(stored):
        raise ArtifactIntegrityError(f"{version}: the stored artifacts are not the ones its metadata lists")
    for name, actual in stored.items():
        _check_hash(version, name, recorded[name], actual)
    return dict(metadata)


class FolderBackend(RegistryBackend):
    """Versions as folders with ``metadata.json``, ``CURRENT.json`` beside them, an ``flock`` for changes."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    @property
    def location(self) -> str:
        return str(self._root)

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._root.mkdir(parents=True, exist_ok=True)
        with (self._root / ".lock").open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def change(self) -> Iterator[RegistryChange]:
        with self._locked():
            yield _FolderChange(self)

    # -- reading -----------------------------------------------------------------------------------
    def _version_dir(self, version: str) -> Path:
        # Version names come from clients (CLI, API): refuse anything that is not a plain folder name.
        if not version or version != Path(version).name or version.startswith("."):
            raise VersionNotFoundError(f"no model version {version!r}", details={"version": version})
        return self._root / version

    def get(self, version: str) -> ModelVersion:
        path = self._version_dir(version)
        try:
            metadata = json.loads((path / METADATA).read_text())
        except FileNotFoundError:
            raise VersionNotFoundError(f"no model version {version!r}", details={"version": version}) from None
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"metadata of {version!r} is unreadable: {exc}") from exc
        return ModelVersion(version, path, metadata, str(path))

    def versions(self) -> list[ModelVersion]:
        if not self._root.is_dir():
            return []
        found = []
        for path in sorted(self._root.iterdir()):
            if path.is_dir() and not path.name.startswith(".") and (path / METADATA).is_file():
                with contextlib.suppress(ModelStoreError):
                    found.append(self.get(path.name))
        return found

    def pointer(self) -> Pointer:
        """``CURRENT.json``; :class:`ModelStoreError` if it is unreadable, not JSON or not of that shape."""
        try:
            pointer = json.loads((self._root / POINTER).read_text())
        except FileNotFoundError:
            return Pointer(None, [])
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"{POINTER} is unreadable: {exc}") from exc
        return parse_pointer(pointer, POINTER)

    def is_registered(self, version: str) -> bool:
        try:
            return (self._version_dir(version) / METADATA).is_file()
        except VersionNotFoundError:
            return False

    # -- writing -----------------------------------------------------------------------------------
    def create(
        self, version: str, artifacts: Mapping[str, ArtifactWriter], record: Callable[[dict[str, str]], dict[str, Any]]
    ) -> ModelVersion:
        """Each artifact writer fills one file in a temporary folder; their sha256 sums go into
        ``metadata.json`` and the folder is renamed into place in one step."""
        final = self._version_dir(version)
        self._root.mkdir(parents=True, exist_ok=True)
        self._prune_staging()
        staging = Path(tempfile.mkdtemp(dir=self._root, prefix=f".staging-{version}-"))
        try:
            hashes: dict[str, str] = {}
            for name, write in artifacts.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                hashes[name] = sha256_file(target)
                target.chmod(0o444)
            metadata = record(hashes)
            _write_json_atomic(staging / METADATA, metadata)
            staging.chmod(0o755)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ModelVersion(version, final, metadata, str(final))

    def _prune_staging(self, older_than_seconds: float = 3600.0) -> None:
        """Remove staging folders a killed writer left behind (never versions: they were not renamed)."""
        cutoff = time.time() - older_than_seconds
        for path in self._root.glob(".staging-*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path)
                    log.info("staging_pruned", path=path.name)

    # -- artifacts ---------------------------------------------------------------------------------
    def read_artifact(self, entry: ModelVersion, name: str, hashes: Mapping[str, str]) -> bytes:
        return _read_verified(self._folder(entry), entry.version, hashes, name)

    def check_artifact(self, entry: ModelVersion, name: str, expected: str) -> None:
        try:
            actual = sha256_file(self._folder(entry) / name)
        except OSError as exc:
            raise ArtifactIntegrityError(f"{entry.version}: artifact {name} unreadable ({exc})") from exc
        _check_hash(entry.version, name, expected, actual)

    def _folder(self, entry: ModelVersion) -> Path:
        return entry.path if entry.path is not None else self._version_dir(entry.version)


class _FolderChange(RegistryChange):
    def __init__(self, backend: FolderBackend) -> None:
        self._backend = backend

    def get(self, version: str) -> ModelVersion:
        return self._backend.get(version)

    def pointer(self) -> Pointer:
        return self._backend.pointer()

    def set_pointer(self, pointer: Pointer) -> None:
        _write_json_atomic(self._backend.root / POINTER, {"version": pointer.version, "history": pointer.history})

    def set_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        _write_json_atomic(self._backend._version_dir(version) / METADATA, metadata)


def _database_backend(settings: Settings) -> RegistryBackend:
    from app.ml.registry_db import DatabaseBackend  # SQLAlchemy and the object store client: only when used

    return DatabaseBackend.from_settings(settings)


BACKENDS: dict[str, Callable[[Settings], RegistryBackend]] = {
    "file": lambda settings: FolderBackend(_folder_of(settings)),
    "s3": _database_backend,
}
"""How :meth:`ModelRegistry.from_settings` opens a store, by the scheme of ``SENTIMENT_MODEL_STORE_URL``
(unset: ``file``, the ``SENTIMENT_MODEL_STORE`` folder)."""


def _folder_of(settings: Settings) -> Path:
    """The store folder: ``SENTIMENT_MODEL_STORE``, or the path of a ``file://`` store URL."""
    if settings.model_store_url is None:
        return settings.model_store
    from app.ml.artifact_store import FileArtifactStore

    return FileArtifactStore.from_url(settings.model_store_url, settings.state_dir, {}).root


# -- the registry ---------------------------------------------------------------------------------------


class ModelRegistry:
    """The model store shared by the trainer, the CLI and every web worker, over a :class:`RegistryBackend`
    (a folder path means :class:`FolderBackend`).

    With ``signing_key``, registration signs versions and only versions whose signature verifies are
    loaded or promoted; without it, signatures are neither written nor checked.
    """

    def __init__(self, root: Path | RegistryBackend, signing_key: bytes | None = None) -> None:
        self.backend = root if isinstance(root, RegistryBackend) else FolderBackend(root)
        self._signing_key = signing_key

    @property
    def root(self) -> Path | None:
        """The store's folder (None for a store in a database and an object store)."""
        return self.backend.root

    @property
    def location(self) -> str:
        """Where the store is, for messages."""
        return self.backend.location

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The store ``SENTIMENT_MODEL_STORE_URL`` names (:data:`BACKENDS`; unset: the ``SENTIMENT_MODEL_STORE``
        folder) with the key of ``SENTIMENT_MODEL_SIGNING_KEY[_FILE]``.

        :class:`ModelStoreError` for an unsupported URL, if the key is configured but blank, or if its file
        lies inside the store folder (whoever can write the store must not be able to read the key).
        """
        scheme = urlsplit(settings.model_store_url).scheme if settings.model_store_url else "file"
        opener = BACKENDS.get(scheme)
        if opener is None:
            raise ModelStoreError(f"unsupported model store URL {settings.model_store_url!r}")
        key_file = settings.model_signing_key_file
        folder = _folder_of(settings) if scheme == "file" else None
        if key_file is not None and folder is not None and key_file.resolve().is_relative_to(folder.resolve()):
            raise ModelStoreError(f"the model signing key file {key_file} must be kept outside the model store")
        key = settings.secret("model_signing_key")
        if key is None and (settings.model_signing_key is not None or key_file is not None):
            # A blank key must not quietly turn signing off where an operator asked for it.
            raise ModelStoreError("the model signing key is configured but blank")
        return cls(opener(settings), key.encode() if key else None)

    def close(self) -> None:
        """Release the backend's connections (a folder store holds none)."""
        self.backend.close()

    @property
    def signing(self) -> bool:
        """True if versions are signed and only signed versions are loaded."""
        return self._signing_key is not None

    # -- reading -----------------------------------------------------------------------------------
    def get(self, version: str) -> ModelVersion:
        """The version's metadata; :class:`VersionNotFoundError` if it is not registered."""
        return self.backend.get(version)

    def versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first (names sort by creation time)."""
        return self.backend.versions()

    def current_version(self) -> str | None:
        """Name of the version the service should serve, or None if nothing was promoted yet.

        :class:`ModelStoreError` if the pointer is unreadable, malformed or names no registered version.
        """
        version = self.backend.pointer().version
        if version is None or self.backend.is_registered(version):
            return version
        where = POINTER if isinstance(self.backend, FolderBackend) else "the current pointer"
        raise ModelStoreError(f"{where} names {version!r}, which is not a registered version")

    # -- writing -----------------------------------------------------------------------------------
    def register(
        self,
        artifacts: Mapping[str, ArtifactWriter],
        metadata: Mapping[str, Any],
        stage: Stage = "candidate",
        version: str | None = None,
    ) -> ModelVersion:
        """Store a new immutable version and return it.

        Every artifact is stored (and hashed) before the metadata recording their sha256 sums (and, with
        a key, the signature over them): a version is never visible half-written.
        """
        if MODEL_ARTIFACT not in artifacts:
            raise ModelStoreError(f"a version needs a {MODEL_ARTIFACT} artifact")
        name = version or new_version_name()

        def record(hashes: dict[str, str]) -> dict[str, Any]:
            card = {
                **metadata,
                "version": name,
                "stage": stage,
                "created_at": datetime.now(UTC).isoformat(),
                "artifacts": hashes,
            }
            if self._signing_key is not None:
                card[SIGNATURE] = signature(self._signing_key, name, hashes)
            return card

        entry = self.backend.create(name, artifacts, record)
        log.info("model_registered", model_version=name, stage=stage)
        return entry

    def import_version(self, source: ModelVersion, artifacts: Mapping[str, bytes]) -> tuple[ModelVersion, bool]:
        """Register ``source``, a version of another store, under its own name with its metadata verbatim
        (``created_at``, stage, hashes, signature) and ``artifacts``, the bytes of each of its artifacts; then
        verify it as stored here (:meth:`verify`: the signature with a key, every artifact's sha256, read back).

        Returns the version as this store holds it and whether it was stored now; False: it was already
        registered with the same hashes (a copy running again), so copying twice stores nothing twice.
        :class:`ArtifactIntegrityError` if the bytes are not the ones ``source`` records (nothing is stored),
        :class:`ModelStoreError` if this store has a version of that name with other artifacts.
        """
        hashes = self._recorded_hashes(source)
        if set(artifacts) != set(hashes):
            raise ArtifactIntegrityError(f"{source.version}: the artifacts given are not the ones its metadata lists")
        for name, data in artifacts.items():
            _check_hash(source.version, name, hashes[name], hashlib.sha256(data).hexdigest())
        created = not self.backend.is_registered(source.version)
        if created:
            entry = self.backend.import_version(source.metadata, artifacts)
        else:
            entry = self.get(source.version)
            if entry.metadata.get("artifacts") != hashes:
                raise ModelStoreError(
                    f"{source.version} exists in {self.location} with other artifacts; versions are immutable",
                    details={"version": source.version},
                )
        self.verify(entry)
        log.info("model_imported", model_version=source.version, stored=created)
        return entry, created

    def import_pointer(self, pointer: Pointer) -> bool:
        """Make ``pointer`` (another store's current version and history) this store's: the last step of a copy.
        Every version it names must be registered here. Returns False if this store already had it.

        :class:`ModelStoreError` if this store already has another current version or history (it was used
        meanwhile: its choice stays); :class:`VersionNotFoundError` for a version missing here.
        """
        with self.backend.change() as change:
            present = change.pointer()
            if present == pointer:
                return False
            if present.version is not None or present.history:
                raise ModelStoreError(
                    f"{self.location} already has a current version ({present.version}, history {present.history}); "
                    f"not replacing it with {pointer.version} (history {pointer.history})"
                )
            for version in {pointer.version, *pointer.history} - {None}:
                change.get(str(version))
            change.set_pointer(pointer)
        log.info("model_pointer_imported", model_version=pointer.version, history=len(pointer.history))
        return True

    def promote(
        self, version: str, expected_current: str | None = None, precondition: Callable[[], None] | None = None
    ) -> str | None:
        """Make ``version`` current; returns the version it replaced. Rejected versions are refused.

        With ``expected_current`` (a retrain passes the version it improved on), the promotion happens only
        if that version is still current, checked inside the store's serialised change (its lock or
        transaction): otherwise an operator promoted or rolled back meanwhile and
        :class:`CurrentVersionChangedError` leaves their choice in place. ``precondition`` runs inside that
        change too, before anything is written: an exception it raises cancels the promotion and propagates.
        """
        with self.backend.change() as change:
            if precondition is not None:
                precondition()
            entry = change.get(version)
            if entry.stage == "rejected":
                raise ModelStoreError(f"{version} was rejected by the promotion gate; it cannot be promoted")
            self.verify(entry)
            pointer = change.pointer()
            previous = pointer.version
            if expected_current is not None and previous != expected_current:
                raise CurrentVersionChangedError(
                    f"{version} was not promoted: it expected {expected_current} to be current, but {previous} is",
                    details={"reason": "parent_not_current", "expected": expected_current, "current": previous},
                )
            if previous == version:
                return previous
            history = [*pointer.history, previous] if previous else pointer.history
            change.set_pointer(Pointer(version, history))
            _set_stage(change, version, "production")
            if previous:
                with contextlib.suppress(VersionNotFoundError):
                    _set_stage(change, previous, "archived")
        log.info("model_promoted", model_version=version, previous_version=previous)
        return previous

    def rollback(self, expected_current: str | None = None, *, reject: bool = False) -> str:
        """Make the previously current version current again; returns it.

        With ``expected_current`` (the promotion watch passes the version it judged), the rollback happens only
        if that version is still current, checked inside the store's serialised change: otherwise an operator
        promoted or rolled back meanwhile and :class:`CurrentVersionChangedError` leaves their choice in place.
        With ``reject``, the version rolled back from becomes ``rejected`` (never promoted again) instead of
        ``archived``.
        """
        with self.backend.change() as change:
            pointer = change.pointer()
            if expected_current is not None and pointer.version != expected_current:
                raise CurrentVersionChangedError(
                    f"not rolled back: {expected_current} was expected to be current, but {pointer.version} is",
                    details={"reason": "not_current", "expected": expected_current, "current": pointer.version},
                )
            if not pointer.history:
                raise ModelStoreError("nothing to roll back to: no earlier version was ever current")
            target = pointer.history[-1]
            self.verify(change.get(target))
            change.set_pointer(Pointer(target, pointer.history[:-1]))
            _set_stage(change, target, "production")
            if pointer.version:
                with contextlib.suppress(VersionNotFoundError):
                    _set_stage(change, pointer.version, "rejected" if reject else "archived")
        log.info("model_rolled_back", model_version=target, previous_version=pointer.version, rejected=reject)
        return target

    def sign(self, version: str) -> None:
        """(Re-)sign ``version`` with the configured key, after checking its artifacts against its hashes.

        For adopting signing on an existing store: sign only a store you trust, since the hashes it signs
        are the ones its metadata holds now. :class:`ModelStoreError` without a key.
        """
        if self._signing_key is None:
            raise ModelStoreError("no signing key: set SENTIMENT_MODEL_SIGNING_KEY or SENTIMENT_MODEL_SIGNING_KEY_FILE")
        with self.backend.change() as change:
            entry = change.get(version)
            hashes = self._verify_hashes(entry)
            change.set_metadata(version, {**entry.metadata, SIGNATURE: signature(self._signing_key, version, hashes)})
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
            if name not in skip:
                self.backend.check_artifact(entry, name, expected)
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
            data = self.backend.read_artifact(entry, MODEL_ARTIFACT, hashes)
        except ArtifactIntegrityError as exc:
            event = "model_signature_invalid" if isinstance(exc, ModelSignatureError) else "model_integrity_failed"
            log.error(event, model_version=version, reason=exc.message)
            raise
        model = load_model(io.BytesIO(data), entry.metadata.get("params"))
        recorded = entry.metadata.get("model", {}).get("kind", model.kind)
        if recorded != model.kind:
            raise ModelStoreError(f"{version}: model.joblib holds a {model.kind!r} model, metadata says {recorded!r}")
        return LoadedModel(version, model, entry.metadata, entry.path, self.backend.artifact_store)

    def load_current(self) -> LoadedModel | None:
        """The current version, verified and loaded, or None if nothing was promoted yet."""
        version = self.current_version()
        return self.load(version) if version else None


def _set_stage(change: RegistryChange, version: str, stage: Stage) -> None:
    entry = change.get(version)
    change.set_metadata(version, {**entry.metadata, "stage": stage})
