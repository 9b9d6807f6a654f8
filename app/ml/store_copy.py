"""Copying a model store into another (a folder into a database and an object store): every version verbatim,
verified by sha256 on both sides, then the current pointer and its history.

Each version is verified in the source (signature with a key, every artifact's sha256), its bytes read once,
registered in the target under its own name with its metadata unchanged (:meth:`ModelRegistry.import_version`)
and verified again as the target stores it. A version the target already holds with the same hashes is
skipped, so a copy interrupted anywhere can run again. A version that fails is reported and not registered;
the pointer is copied only once every version it names is in the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from app.errors import SentimentServiceError
from app.ml.registry import ModelRegistry

log = structlog.get_logger(__name__)


@dataclass
class StoreCopy:
    """What :func:`copy_store` did: versions stored now, already there, failed (with why); the pointer."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pointer: str = ""
    """``copied``, ``unchanged`` (the target had it), ``none`` (nothing promoted) or why it was not copied."""
    pointer_copied: bool = False

    @property
    def ok(self) -> bool:
        """Every version is in the target, verified, and the target's pointer is the source's."""
        return not self.failed and self.pointer in {"copied", "unchanged", "none"}


def copy_store(
    source: ModelRegistry, target: ModelRegistry, echo: Callable[[str], None] = lambda _line: None
) -> StoreCopy:
    """Copy every version of ``source`` into ``target``, then its current pointer; ``echo`` gets a line per
    version. Never raises for one version: its failure (a changed artifact, a missing one, a bad signature, a
    name the target holds with other bytes) is recorded in :attr:`StoreCopy.failed`."""
    result = StoreCopy()
    for entry in source.versions():
        try:
            source.verify(entry)
            hashes = entry.metadata["artifacts"]
            artifacts = {name: source.backend.read_artifact(entry, name, hashes) for name in hashes}
            _, stored = target.import_version(entry, artifacts)
        except SentimentServiceError as exc:
            result.failed[entry.version] = exc.message
            log.error("model_copy_failed", model_version=entry.version, reason=exc.message)
            echo(f"failed    {entry.version}: {exc.message}")
            continue
        (result.copied if stored else result.skipped).append(entry.version)
        echo(f"{'copied' if stored else 'present':9} {entry.version} ({entry.stage}, {len(artifacts)} artifacts)")
    pointer = source.backend.pointer()
    if pointer.version is None and not pointer.history:
        result.pointer = "none"
        return result
    missing = sorted(set(result.failed).intersection([*pointer.history, pointer.version]))
    if missing:
        result.pointer = f"not copied: it names {', '.join(missing)}, which failed"
        return result
    try:
        result.pointer_copied = target.import_pointer(pointer)
    except SentimentServiceError as exc:
        result.pointer = f"not copied: {exc.message}"
        return result
    result.pointer = "copied" if result.pointer_copied else "unchanged"
    return result
