#!/bin/sh
# Container start: train the default model on first start (empty store volume), wipe the metrics
# directory, migrate the prediction database (`app.cli db upgrade`), then run gunicorn and the drift
# monitor under the supervisor (PID 1 gets SIGTERM).
set -eu
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
python -m app.cli train --if-empty
python -m app.cli db upgrade  # the service refuses a database whose schema is behind
exec python -m app.supervisor
