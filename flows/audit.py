"""Prefect flows of the audit (issue 5): `audit` (every baseline and mitigation, several seeds),
`transfer` (the saved mask on a second dataset of other modalities) and `release` (a synthetic
dataset screened against the training set). Each logs to MLflow through tasks/tracking.py: a parent
run per flow, a child run per arm and seed."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from memcontrol.audit.run import run_audit
from memcontrol.audit.transfer import run_transfer
from memcontrol.config import Params, load_params
from memcontrol.release import build_release
from memcontrol.workdir import Layout
from tasks import tracking
from tasks.progress import bars

log = logging.getLogger("memcontrol.audit")


def _setup(params_path: str, root: str | None) -> tuple[Params, Path]:
    params = load_params(params_path)
    return params, Path(root or params.workdir).resolve()


def _logger(params: Params, root: Path, kind: str, run_params: dict):
    """A callback logging each arm-seed record as an MLflow child of a `kind` parent run."""
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, root)
    parent = tracking.parent_run(uri, params.tracking.experiment, root, kind=kind, name=params.search.study_name,
                                 params=run_params)

    def on_record(rec: dict) -> None:
        metrics = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}
        arm_dir = Path(rec["dir"])
        tracking.log_child(uri, params.tracking.experiment, root, parent, name=f"{rec['arm']}-seed{rec['seed']}",
                           record={"mask": rec["mask"], "metrics": metrics},
                           artifacts=[arm_dir / "grid.png", arm_dir / "samples.png", arm_dir / "nearest.png",
                                      arm_dir / "audit.json"],
                           extra_params={"arm": rec["arm"], "seed": rec["seed"]})

    return uri, parent, on_record


@task(cache_policy=NO_CACHE)
def audit_task(params: Params, root: str) -> dict:
    """All arms x seeds (finished ones reused), then the report."""
    layout = Layout(Path(root))
    n = len(params.audit.arms) * len(params.audit.seeds)
    log.warning("audit: %d arms x %d seeds = %d fine-tunes, each evaluated and attacked: the longest stage "
                "(README, DVC: times per target); finished arm-seeds are reused", len(params.audit.arms),
                len(params.audit.seeds), n)
    uri, parent, on_record = _logger(params, layout.root, "audit", {
        "arms": ",".join(params.audit.arms), "seeds": list(params.audit.seeds),
        "steps": params.audit.steps or params.final.steps, "method_lr": params.audit.method_lr,
        "mitigations": params.audit.mitigations.model_dump(mode="json")})
    with bars() as progress:
        res = run_audit(params, layout, progress=progress, on_record=on_record)
    tracking.log_files(uri, params.tracking.experiment, layout.root, parent,
                       [res["md"], res["html"], res["metrics"], res["plots"], *res["figures"]],
                       metrics={"n_records": len(res["records"])}, finish=True)
    return {"md": str(res["md"]), "html": str(res["html"]), "metrics": str(res["metrics"])}


@flow(name="audit")
def audit(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The selected mask against full fine-tuning, each PEFT method unmasked and the mitigations."""
    params, workdir = _setup(params_path, root)
    return audit_task(params, str(workdir))


@task(cache_policy=NO_CACHE)
def transfer_task(params: Params, root: str) -> dict:
    layout = Layout(Path(root))
    uri, parent, on_record = _logger(params, layout.root, "transfer", {
        "arms": ",".join(params.transfer.arms), "seeds": list(params.transfer.seeds),
        "mask": str(params.transfer.mask or layout.selected),
        "n_train": params.transfer.n_train, "n_test": params.transfer.n_test})
    with bars() as progress:
        res = run_transfer(params, layout, progress=progress, on_record=on_record)
    tracking.log_files(uri, params.tracking.experiment, layout.root, parent,
                       [res["md"], res["html"], res["metrics"], *res["figures"]],
                       metrics={"n_records": len(res["records"])}, finish=True)
    return {"md": str(res["md"]), "html": str(res["html"]), "metrics": str(res["metrics"])}


@flow(name="transfer")
def transfer(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The saved mask on the transfer dataset (CT/MR slices) against full FT and the unmasked method."""
    params, workdir = _setup(params_path, root)
    return transfer_task(params, str(workdir))


@task(cache_policy=NO_CACHE)
def release_task(params: Params, root: str) -> dict:
    layout = Layout(Path(root))
    summary = build_release(params, layout)
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, layout.root)
    release = params.release
    parent = tracking.parent_run(uri, params.tracking.experiment, layout.root, kind="release",
                                 name=params.search.study_name,
                                 params={"seed": release.seed, "n_prompts": release.n_prompts,
                                         "per_prompt": release.per_prompt, "pixel_guard": release.pixel_guard})
    out = layout.root / "release"
    tracking.log_files(uri, params.tracking.experiment, layout.root, parent, [out / "summary.json", out / "manifest.csv", out / "README.md"],
                       metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, finish=True)
    return summary


@flow(name="release")
def release(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """A synthetic dataset from models/final, every sample too close to a training image excluded."""
    params, workdir = _setup(params_path, root)
    return release_task(params, str(workdir))
