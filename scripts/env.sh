# Offline, quiet settings for every entry point (the list of memcontrol/offline.py), and the project's
# .venv/bin first on PATH, so `memcontrol`, `dvc`, `mlflow` and dvc.yaml's stage commands are found.
# Sourced by the scripts; `source scripts/env.sh` from the repository root in a shell of your own.
_memcontrol_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
case ":$PATH:" in *":$_memcontrol_root/.venv/bin:"*) ;; *) export PATH="$_memcontrol_root/.venv/bin:$PATH" ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
unset PREFECT_API_URL 2>/dev/null || true   # local ephemeral Prefect API unless you export one after sourcing
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_EPHEMERAL_ENABLED=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_LEVEL="${PREFECT_LOGGING_LEVEL:-WARNING}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export PREFECT_LOCAL_STORAGE_PATH="$PREFECT_HOME/storage"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export DVC_NO_ANALYTICS=1
