"""Monitoring: Prometheus metrics, drift tests, feedback, and the drift monitor process."""
