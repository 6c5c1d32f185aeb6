"""Every flow as a Prefect deployment, served from one process (`memcontrol serve`): a user starts a
run, with its parameters, or puts a flow on a schedule, from the Prefect UI or API.

Prefect's own mechanism: `flow.to_deployment(...)` for each flow and `prefect.serve(...)`, which
registers the deployments with the server at PREFECT_API_URL, then polls it and runs each flow run
(from the UI's "Run", a schedule, or `run_deployment`) in a subprocess of this one, in this folder.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# flow name -> module under flows/ (each stage's flow, plus `demo` that chains them)
FLOWS = {
    "prepare": "pipeline", "base": "pipeline", "reference": "pipeline", "search": "pipeline",
    "select": "pipeline", "finetune": "pipeline", "compare": "pipeline", "demo": "pipeline",
    "audit": "audit", "transfer": "audit", "release": "audit", "export": "export",
}
DEPLOYMENT = "memcontrol"  # each deployment is `<flow>/memcontrol` in the UI and for run_deployment


class ServeError(ValueError):
    """A bad `memcontrol serve` setting (the CLI prints it on one line)."""


def parse_schedules(specs: list[str]) -> dict[str, str]:
    """`FLOW=CRON` strings (e.g. "search=0 2 * * *") -> {flow: cron}."""
    from prefect.client.schemas.schedules import CronSchedule

    out = {}
    for spec in specs:
        name, sep, cron = spec.partition("=")
        name, cron = name.strip(), cron.strip()
        if not sep or name not in FLOWS:
            raise ServeError(f"--cron {spec!r}: expected FLOW=CRON with FLOW one of {', '.join(FLOWS)}")
        try:
            CronSchedule(cron=cron)  # Prefect's own check of the expression
        except ValueError as e:
            raise ServeError(f"--cron {spec!r}: {cron!r} is not a cron expression") from e
        out[name] = cron
    return out


def deployments(params_path: str, root: str | None, schedules: dict[str, str]) -> list:
    """One RunnerDeployment per flow. Its default parameters point at this params file (absolute,
    so a run started from the UI reads the same file); the UI's form can change any of them."""
    from prefect.deployments.runner import EntrypointType

    defaults = {"params_path": str(Path(params_path).resolve())}
    if root is not None:
        defaults["root"] = str(Path(root).resolve())
    out = []
    for name, module in FLOWS.items():
        flow = getattr(importlib.import_module(f"flows.{module}"), name)
        out.append(flow.to_deployment(
            DEPLOYMENT, parameters=defaults, cron=schedules.get(name), tags=["memcontrol"],
            # the installed `flows` package, not a file path: the runs import what this process imports
            entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def serve(params_path: str, root: str | None, schedules: dict[str, str], limit: int) -> None:
    """Register every deployment and run its flow runs until interrupted (Ctrl-C pauses the schedules)."""
    from prefect import serve as prefect_serve

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ServeError("PREFECT_API_URL is not set: start a server (`prefect server start`) and "
                             "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if not Path(params_path).is_file():
        raise ServeError(f"{params_path}: no such params file")
    prefect_serve(*deployments(params_path, root, schedules), limit=limit)
