#!/bin/sh
# Container start: train the default model on first start (empty store volume), wipe the metrics
# directory, then run gunicorn and the drift monitor under the supervisor (PID 1 gets SIGTERM).
set -eu
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
python -m app.cli train --if-empty
exec python -m app.supervisor
