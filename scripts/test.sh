#!/usr/bin/env bash
# Fresh machine -> the test suite (real Prefect, MLflow SQLite and UI in Chromium, DVC, FAISS, tiny diffusers models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium for the MLflow UI test (tests/test_mlflow_ui.py): Debian's package, installed once.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
source scripts/env.sh
export PREFECT_HOME="$(mktemp -d)/prefect" PREFECT_LOCAL_STORAGE_PATH=""
export PREFECT_LOCAL_STORAGE_PATH="$PREFECT_HOME/storage"
exec .venv/bin/python -m pytest -q "$@"
