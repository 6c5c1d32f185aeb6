import os

# Offline and quiet for every test (docs/stack.md §2); set before any library import.
for k, v in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(k, v)
