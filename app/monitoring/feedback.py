"""Feedback: the true label of a logged prediction, which live accuracy and retraining are built on, and
the credentials that may send it.

A label trains the next model, so only holders of a feedback token may send one, and every label records
the name of the token that sent it: a retrain caps what one name contributes
(``SENTIMENT_RETRAIN_MAX_SOURCE_SHARE``). ``python -m app.cli feedback purge NAME`` forgets a misbehaving
token's labels; ``feedback revoke NAME`` also refuses a leaked token, on every worker and instance sharing the
database, within ``SENTIMENT_FEEDBACK_REVOCATION_REFRESH_SECONDS`` (:class:`RevokedSources`).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import SQLAlchemyError

from app.errors import FeedbackConflictError, PredictionNotFoundError, StorageUnavailableError
from app.monitoring import metrics
from app.retrain.alerts import UnauthorizedError
from app.settings import Settings
from app.storage.feedback_sources import FeedbackSourceRepository
from app.storage.predictions import LEGACY_SOURCE, LabelOutcome, LabelResult, PredictionRepository
from app.storage.recorder import PredictionRecorder

log = structlog.get_logger(__name__)

DEFAULT_SOURCE = "default"
"""The name of a feedback token given without one."""
ANONYMOUS_SOURCE = "anonymous"
"""The name labels are recorded under when development mode accepts feedback without credentials."""
RESERVED_SOURCES = frozenset({ANONYMOUS_SOURCE, LEGACY_SOURCE})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
UNAUTHORIZED_MESSAGE = "a feedback token is required: Authorization: Bearer <token>"
"""The message of a 401 for a missing, wrong or revoked token: the same, so it tells nothing about the token."""


def parse_feedback_tokens(text: str) -> dict[str, str]:
    """``{name: token}`` from the feedback token setting: one ``name:token`` per line or comma, or a single
    plain token (named ``default``). Blank entries and ``#`` comment lines are skipped. Raises
    :class:`ValueError` (never quoting a token) for a bad name, an empty token, or a name or token given twice.

    A plain token must not contain ``:`` (nor ``,``): ``abc:def`` is read as the token ``def`` named ``abc``.
    The tokens ``scripts/serve`` generates never contain either.
    """
    entries = [
        entry.strip()
        for line in text.splitlines()
        if not line.strip().startswith("#")
        for entry in line.split(",")
        if entry.strip()
    ]
    tokens: dict[str, str] = {}
    for number, entry in enumerate(entries, 1):
        name, sep, token = entry.partition(":")
        name, token = (name.strip(), token.strip()) if sep else (DEFAULT_SOURCE, entry)
        if not _NAME.fullmatch(name) or name in RESERVED_SOURCES:
            raise ValueError(
                f"feedback token {number}: the name must be 1-64 of A-Za-z0-9._- and not "
                f"{' or '.join(sorted(RESERVED_SOURCES))}"
            )
        if not token:
            raise ValueError(f"feedback token {number} ({name}) is empty")
        if name in tokens:
            raise ValueError(f"feedback token name {name!r} is given twice")
        if token in tokens.values():
            raise ValueError(f"feedback token {number} ({name}) is the same as another one")
        tokens[name] = token
    return tokens


@dataclass(frozen=True)
class FeedbackCredentials:
    """The feedback tokens a request may present (``Authorization: Bearer <token>``), by name."""

    tokens: tuple[tuple[str, str], ...] = ()
    allow_unauthenticated: bool = False
    revocation_refresh_seconds: float = 5.0  # how stale the revoked names (RevokedSources) may be

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackCredentials:
        """The configured tokens (:class:`ValueError` for an unreadable or malformed setting)."""
        text = settings.secret("feedback_token") or ""
        try:
            tokens = parse_feedback_tokens(text)
        except ValueError as exc:
            raise ValueError(f"SENTIMENT_FEEDBACK_TOKEN(_FILE): {exc}") from None
        return cls(
            tuple(tokens.items()),
            settings.allow_unauthenticated_feedback,
            settings.feedback_revocation_refresh_seconds,
        )

    @property
    def configured(self) -> bool:
        return bool(self.tokens)

    def identify(self, authorization: str) -> str:
        """The name of the token an ``Authorization`` header value presents, or :class:`UnauthorizedError`.

        The presented token is compared with every configured one, in constant time and without stopping at
        a match, so timing tells neither whether nor which token matched. With no token configured, only
        development mode lets a request through, as ``anonymous``.
        """
        if not self.tokens:
            if self.allow_unauthenticated:
                return ANONYMOUS_SOURCE
            log.warning("feedback_unauthorized", reason="no_token_configured")
            raise UnauthorizedError("feedback is not accepted: no feedback token is configured")
        scheme, _, given = authorization.partition(" ")
        presented = given.strip().encode()
        matched: str | None = None
        for name, token in self.tokens:
            if hmac.compare_digest(presented, token.encode()):
                matched = name
        if matched is None or scheme.lower() != "bearer":
            log.warning("feedback_unauthorized", reason="missing_or_wrong_token")
            raise UnauthorizedError(UNAUTHORIZED_MESSAGE)
        return matched


class RevokedSources:
    """The feedback token names revoked in the database (``python -m app.cli feedback revoke NAME``), reread
    on the database's threads at most every ``refresh_seconds``: every worker and instance sharing the database
    refuses a revoked token that long after the revocation at the latest.

    A reread that fails (the database is down) keeps the last names read and is retried ``refresh_seconds``
    later; feedback is refused with 503 then anyway, as its label cannot be stored.
    """

    def __init__(self, repository: FeedbackSourceRepository, refresh_seconds: float) -> None:
        self.repository = repository
        self.refresh_seconds = refresh_seconds
        self._names: frozenset[str] = frozenset()
        self._read_at = -math.inf  # time.monotonic() of the last reread
        self._reading = asyncio.Lock()

    def _fresh(self) -> bool:
        return time.monotonic() - self._read_at < self.refresh_seconds

    async def names(self) -> frozenset[str]:
        """The revoked names, reread first if the last reread is ``refresh_seconds`` old (one reread at a time)."""
        if not self._fresh():
            async with self._reading:
                if not self._fresh():
                    await self._reread()
        return self._names

    async def _reread(self) -> None:
        try:
            self._names = await self.repository.call(self.repository.revoked)
        except SQLAlchemyError as exc:
            log.warning("feedback_revocations_unavailable", reason=type(exc).__name__, known=len(self._names))
        self._read_at = time.monotonic()


@dataclass(frozen=True)
class FeedbackReceipt:
    prediction_id: str
    label: str
    predicted: str
    correct: bool
    already_recorded: bool
    live_accuracy: float | None


class FeedbackService:
    """Labels predictions in the log and keeps ``sentiment_live_accuracy`` current."""

    def __init__(
        self,
        predictions: PredictionRepository,
        recorder: PredictionRecorder,
        accuracy_window: int,
        credentials: FeedbackCredentials,
    ) -> None:
        self.predictions = predictions
        self.recorder = recorder
        self.accuracy_window = accuracy_window
        self.credentials = credentials
        self.revoked = RevokedSources(
            FeedbackSourceRepository(predictions.database), credentials.revocation_refresh_seconds
        )

    def authenticate(self, authorization: str) -> str:
        """The name of the feedback token the request's ``Authorization`` header presents (else 401); whether
        that name is revoked is checked by :meth:`record`, which may wait for the database."""
        return self.credentials.identify(authorization)

    async def _refuse_revoked(self, source: str) -> None:
        if source in await self.revoked.names():
            log.warning("feedback_unauthorized", reason="revoked", source=source)
            raise UnauthorizedError(UNAUTHORIZED_MESSAGE)

    async def _label(self, prediction_id: str, label: str, source: str) -> LabelResult:
        try:
            return await self.predictions.call(self.predictions.set_label, prediction_id, label, source=source)
        except SQLAlchemyError as exc:
            raise StorageUnavailableError("the prediction log is unavailable; retry later") from exc

    async def record(self, prediction_id: str, label: str, source: str) -> FeedbackReceipt:
        """Store ``label`` for the prediction as sent by the feedback token named ``source``: idempotent for
        the same label, 409 for a different one; 401 if ``source`` is revoked (:class:`RevokedSources`).

        A prediction may still sit in some worker's write buffer for up to one flush interval, so an
        unknown id is looked up once more after that interval before it is declared unknown.
        """
        await self._refuse_revoked(source)
        await self.recorder.flush()
        result = await self._label(prediction_id, label, source)
        if result.outcome is LabelOutcome.NOT_FOUND:
            await asyncio.sleep(self.recorder.flush_interval * 2)
            result = await self._label(prediction_id, label, source)
        if result.outcome is LabelOutcome.NOT_FOUND:
            raise PredictionNotFoundError(
                f"no prediction with id {prediction_id!r}", details={"prediction_id": prediction_id}
            )
        if result.outcome is LabelOutcome.CONFLICT:
            raise FeedbackConflictError(
                f"prediction {prediction_id} is already labelled {result.label!r}",
                details={"prediction_id": prediction_id, "label": result.label},
            )
        accuracy: float | None = None
        if result.outcome is LabelOutcome.STORED:
            metrics.FEEDBACK.labels(sentiment=label).inc()
            try:
                accuracy, _ = await self.predictions.call(self.predictions.live_accuracy, self.accuracy_window)
            except SQLAlchemyError:
                accuracy = None
            if accuracy is not None:
                metrics.LIVE_ACCURACY.set(accuracy)
        assert result.sentiment is not None
        return FeedbackReceipt(
            prediction_id,
            label,
            result.sentiment,
            result.sentiment == label,
            result.outcome is LabelOutcome.UNCHANGED,
            accuracy,
        )
