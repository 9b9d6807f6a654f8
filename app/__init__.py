"""Sentiment service: a versioned scikit-learn model served by gunicorn, watching itself."""
