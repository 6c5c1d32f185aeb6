#!/usr/bin/env bash
# Fresh machine -> the whole MemControl search on the embedded default (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/memcontrol demo "$@"
