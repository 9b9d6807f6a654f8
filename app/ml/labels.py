"""The sentiment classes, in model order: a module without dependencies, so the processes that only export
metrics (supervisor, gunicorn's master) need not import numpy to name them."""

LABELS: tuple[str, str] = ("negative", "positive")
"""Class names in model order: index 0 is negative, 1 is positive."""
