"""Acting on drift: alert webhooks, the guarded retrain and its promotion gate."""
