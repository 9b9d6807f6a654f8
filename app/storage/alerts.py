"""Alert de-duplication: the webhook alert firings a retrain claimed, so re-sends of a firing start no second one.

A firing (``fingerprint@startsAt``) is claimed by the retrain job it started, in the transaction that records
the job (:meth:`app.storage.retrain_jobs.RetrainJobRepository.create_job`), and released when that job ends
without promoting a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from app.storage.database import Repository, webhook_alerts


class AlertRepository(Repository):
    """The ``webhook_alerts`` table, read side; blocking and safe to call from several processes."""

    def unseen(self, identities: Sequence[str]) -> list[str]:
        """The alert firings no running or promoting retrain has claimed."""
        with self.engine.connect() as conn:
            seen = {
                r[0]
                for r in conn.execute(
                    select(webhook_alerts.c.identity).where(webhook_alerts.c.identity.in_(list(identities)))
                )
            }
        return [i for i in identities if i not in seen]
