"""Monitoring: Prometheus metrics, the shared prediction log, and the drift monitor process."""
