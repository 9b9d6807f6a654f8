"""Purged and revoked feedback token names: which tokens the service refuses, and when each name's labels were
last purged (a retrain compares that before promoting, so labels purged while it ran never reach production).

``python -m app.cli feedback purge NAME`` forgets a name's labels and keeps its token valid; ``feedback revoke
NAME`` does the same and refuses the token from then on, on every worker and instance sharing the database
(:class:`app.monitoring.feedback.RevokedSources` rereads the revoked names).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update

from app.storage.database import Repository, feedback_sources
from app.storage.predictions import purge_labels_statement


@dataclass(frozen=True)
class FeedbackSource:
    """A feedback token name an operator purged or revoked."""

    name: str
    purged_at: float  # the latest purge of its labels
    revoked_at: float | None  # None: its token is still accepted


class FeedbackSourceRepository(Repository):
    """The ``feedback_sources`` table; every method is blocking and safe to call from several processes."""

    def purge(self, name: str, *, revoke: bool = False, now: float | None = None) -> int:
        """Forget every label the token named ``name`` sent (the predictions stay, unlabelled) and record the
        purge's time, in one transaction; with ``revoke``, its token is refused from then on (a name revoked
        twice keeps its first revocation time). Returns how many labels were forgotten."""
        now = now or time.time()
        row = feedback_sources.c
        values = {"purged_at": now, **({"revoked_at": func.coalesce(row.revoked_at, now)} if revoke else {})}
        with self.engine.begin() as conn:
            # The labels first: on SQLite that write takes the lock the rest of the transaction needs.
            purged = conn.execute(purge_labels_statement(name)).rowcount
            if not conn.execute(update(feedback_sources).where(row.name == name).values(values)).rowcount:
                conn.execute(
                    insert(feedback_sources).values(name=name, purged_at=now, revoked_at=now if revoke else None)
                )
        return int(purged)

    def revoked(self) -> frozenset[str]:
        """The names whose tokens are refused."""
        with self.engine.connect() as conn:
            query = select(feedback_sources.c.name).where(feedback_sources.c.revoked_at.is_not(None))
            return frozenset(conn.execute(query).scalars())

    def purge_times(self) -> dict[str, float]:
        """``{name: the latest purge of its labels}``: a name whose time changed was purged in between."""
        return {source.name: source.purged_at for source in self.sources()}

    def sources(self) -> list[FeedbackSource]:
        """Every purged or revoked name, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback_sources).order_by(feedback_sources.c.name)).mappings()
            return [FeedbackSource(**r) for r in rows]
