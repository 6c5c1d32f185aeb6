#!/usr/bin/env bash
# Fresh machine -> the test suite (real Prefect, MLflow SQLite, DVC, FAISS, tiny diffusers models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export PREFECT_HOME="$(mktemp -d)/prefect" PREFECT_LOCAL_STORAGE_PATH=""
export PREFECT_LOCAL_STORAGE_PATH="$PREFECT_HOME/storage"
exec .venv/bin/python -m pytest -q "$@"
