#!/usr/bin/env bash
# Fresh machine -> the whole MemControl search on the embedded default (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
export MEMCONTROL_SETUP_SECONDS=$((SECONDS - start))   # printed in the demo's summary
source scripts/env.sh
exec .venv/bin/memcontrol demo "$@"
