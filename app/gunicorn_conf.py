"""gunicorn configuration: ``gunicorn -c app/gunicorn_conf.py 'app.main:create_app()'``.

Values come from the same ``SENTIMENT_*`` settings as the app.
"""

from __future__ import annotations

from typing import Any

from app.process_memory import skip_unused_optional_imports

# First, in the master before any worker forks: the imports below would import rich, and each worker's
# scikit-learn pandas (app/process_memory.py).
skip_unused_optional_imports()

from app.gunicorn_worker import freeze_startup_heap  # noqa: E402
from app.logs import configure_structlog, dict_config  # noqa: E402
from app.monitoring.metrics import initialise_counters, retire_process  # noqa: E402
from app.settings import Settings  # noqa: E402

_settings = Settings()

bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
# uvicorn's worker plus limits for slow and idle clients (app/gunicorn_worker.py).
worker_class = "app.gunicorn_worker.SentimentWorker"
timeout = _settings.worker_timeout_seconds
graceful_timeout = _settings.graceful_timeout_seconds
keepalive = _settings.keepalive_seconds
# Per worker: open connections and requests in progress beyond this answer 503 (uvicorn limit_concurrency).
worker_connections = _settings.worker_connections
backlog = _settings.backlog
# Each worker builds its own app (and loads the model) after the fork: nothing heavy is shared by
# copy-on-write pages that reference counting would dirty anyway, and a worker restart reloads cleanly.
preload_app = False
# A worker recycles after this many requests (with jitter so they do not restart together), bounding
# the effect of any slow leak in a long-lived process.
max_requests = 200_000
max_requests_jitter = 20_000
accesslog = None
logconfig_dict = dict_config(_settings.log_level)
proc_name = "sentiment-service"
# Several services (or test runs) on one host must not fight over one default control socket path.
control_socket_disable = True

configure_structlog(_settings.log_level)


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited (normally or killed) and was reaped: drop its live gauges and fold its other metric
    files (and those of any other dead process) into the aggregates; its counts stay in the totals."""
    retire_process(worker.pid)


def post_worker_init(worker: Any) -> None:
    """A worker is ready: write a 0 for every labelled counter an alert reads, so that each counter's first
    increment shows in ``rate()``/``increase()`` (a series that appears at 1 has no sample before it); keep
    the garbage collector off what it has built (:func:`app.gunicorn_worker.freeze_startup_heap`)."""
    initialise_counters()
    freeze_startup_heap()
