"""The one module that talks to MLflow: a parent run per study (or audit), a child run per trial
(or arm and seed), logging the mask as bits and block names, every metric and the sample grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def _client(uri: str, experiment: str, root: Path) -> tuple[MlflowClient, str]:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # explicit artifact location: otherwise it is resolved from whatever the CWD is at creation
        exp_id = client.create_experiment(experiment, artifact_location=(root / "mlruns").resolve().as_uri())
    else:
        exp_id = exp.experiment_id
    return client, exp_id


def tracking_uri(uri: str, root: Path) -> str:
    """A relative sqlite path in params.yaml is relative to the working directory `root`."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def parent_run(uri: str, experiment: str, root: Path, *, kind: str, name: str, params: dict) -> str:
    """Find-or-create the parent run tagged (kind, name), so a resumed study logs under the same run."""
    client, exp_id = _client(uri, experiment, root)
    found = client.search_runs([exp_id], f"tags.memcontrol_kind = '{kind}' and tags.memcontrol_name = '{name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{kind}:{name}", tags={"memcontrol_kind": kind, "memcontrol_name": name})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


def log_child(uri: str, experiment: str, root: Path, parent_id: str, *, name: str, record: dict,
              artifacts: list[Path] = (), extra_params: dict | None = None) -> str:
    """One child run: mask bits and enabled block names as params, every metric, artifacts."""
    client, exp_id = _client(uri, experiment, root)
    found = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.memcontrol_child = '{name}'",
                               max_results=1)
    if found:  # already logged by an earlier (interrupted) run of the flow
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_id, "memcontrol_child": name})
    rid = run.info.run_id
    mask = record["mask"]
    params = {
        "method": mask["method"], "mode": mask.get("mode", ""), "lr": mask["lr"],
        "bits": "".join(map(str, mask["bits"])),
        "enabled_blocks": ",".join(b for b, x in zip(mask["blocks"], mask["bits"]) if x) or "(none)",
        "n_blocks": len(mask["blocks"]), **(extra_params or {}),
    }
    for i, (b, x) in enumerate(zip(mask["blocks"], mask["bits"])):
        params[f"bit.{b}"] = x
    for k, v in params.items():
        client.log_param(rid, k, str(v)[:6000])
    for k, v in record["metrics"].items():
        if isinstance(v, (int, float)) and v == v:
            client.log_metric(rid, k, float(v))
    client.log_text(rid, json.dumps(mask, indent=2, sort_keys=True), "mask.json")
    for a in artifacts:
        if Path(a).exists():
            client.log_artifact(rid, str(a))
    client.set_terminated(rid, "FINISHED")
    return rid


def log_files(uri: str, experiment: str, root: Path, run_id: str, files: list[Path], metrics: dict | None = None,
              finish: bool = False) -> None:
    client, _ = _client(uri, experiment, root)
    for f in files:
        if Path(f).exists():
            client.log_artifact(run_id, str(f))
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and v == v:
            client.log_metric(run_id, k, float(v))
    if finish:
        client.set_terminated(run_id, "FINISHED")


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
