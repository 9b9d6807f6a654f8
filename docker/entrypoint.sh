#!/bin/sh
# Container start: wipe the metrics directory, migrate the prediction database (`app.cli db upgrade`),
# train the default model on first start (empty store volume), then run gunicorn and the drift monitor
# under the supervisor (PID 1 gets SIGTERM).
set -eu
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
python -m app.cli db upgrade  # the service refuses a database whose schema is behind
python -m app.cli train --if-empty  # after the upgrade: its `registered` event goes to model_events
exec python -m app.supervisor
