"""The retrain triggers the metrics pre-initialise are the registered webhook sources and the admin endpoint."""

from __future__ import annotations

from app.monitoring.metrics import RETRAIN_TRIGGERS
from app.retrain.webhooks import SOURCES

MANUAL = "manual"  # POST /v1/retrain's trigger (app/api/retrain.py)


def test_every_webhook_source_and_the_manual_trigger_have_their_retrain_series_initialised() -> None:
    """A source added to SOURCES but not to RETRAIN_TRIGGERS would count its first retrain invisibly (no 0 sample
    before it); metrics cannot read SOURCES itself (app.retrain.webhooks imports app.monitoring.metrics)."""
    assert sorted(RETRAIN_TRIGGERS) == sorted({source.name for source in SOURCES} | {MANUAL})
    assert len(set(RETRAIN_TRIGGERS)) == len(RETRAIN_TRIGGERS)
