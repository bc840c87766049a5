#!/usr/bin/env bash
# The main job on the built-in default: sets the machine up if needed, then Fashion-MNIST end to end
# (shards -> DeepSpeed training on 2 local ranks -> export/fold -> evaluation -> benchmark -> plots).
# Extra arguments go to `python -m pipelines.quickstart` (e.g. --ranks 1, --set schedule.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipelines.quickstart "$@"
