"""Offline and quiet settings for every entry point: the one list (scripts/env.sh exports the same for
the shell scripts). Setting environment variables imports nothing, so the library stays free of
Prefect/MLflow/DVC imports."""

import os

ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false",
}


def apply() -> None:
    """Set each variable unless the caller already chose a value; call before prefect/mlflow/transformers import."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
