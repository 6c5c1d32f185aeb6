"""Prefect flows of the audit (issue 5): `audit` (every baseline and mitigation, several seeds),
`transfer` (the saved mask on a second dataset of other modalities) and `release` (a synthetic
dataset screened against the training set). Each logs to MLflow through tasks/tracking.py: a parent
run per flow, a child run per arm and seed."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from memcontrol import audit as A
from memcontrol import release as R
from memcontrol import stages
from memcontrol.config import Params, load_params
from tasks import tracking
from tasks.progress import bars

log = logging.getLogger(__name__)


def _setup(params_path: str, root: str | None) -> tuple[Params, Path, stages.Layout]:
    p = load_params(params_path)
    r = Path(root or p.workdir).resolve()
    return p, r, stages.Layout(r)


def _logger(p: Params, root: Path, kind: str, params: dict):
    """A callback logging each arm-seed record as an MLflow child of a `kind` parent run."""
    uri = tracking.tracking_uri(p.tracking.mlflow_uri, root)
    parent = tracking.parent_run(uri, p.tracking.experiment, root, kind=kind, name=p.search.study_name, params=params)

    def on_record(rec: dict) -> None:
        metrics = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}
        d = Path(rec["dir"])
        tracking.log_child(uri, p.tracking.experiment, root, parent, name=f"{rec['arm']}-seed{rec['seed']}",
                           record={"mask": rec["mask"], "metrics": metrics},
                           artifacts=[d / "grid.png", d / "nearest.png", d / "audit.json"],
                           extra_params={"arm": rec["arm"], "seed": rec["seed"]})

    return uri, parent, on_record


@task(cache_policy=NO_CACHE)
def audit_task(p: Params, root: str) -> dict:
    """All arms x seeds (finished ones reused), then the report."""
    L = stages.Layout(Path(root))
    uri, parent, on_record = _logger(p, L.root, "audit", {
        "arms": ",".join(p.audit.arms), "seeds": list(p.audit.seeds), "steps": p.audit.steps or p.final.steps,
        "method_lr": p.audit.method_lr, "mitigations": p.audit.mitigations.model_dump(mode="json")})
    with bars() as progress:
        res = A.run_audit(p, L, progress=progress, on_record=on_record)
    tracking.log_files(uri, p.tracking.experiment, L.root, parent,
                       [res["md"], res["html"], res["metrics"], res["plots"], *res["figures"]],
                       metrics={"n_records": len(res["records"])}, finish=True)
    return {"md": str(res["md"]), "html": str(res["html"]), "metrics": str(res["metrics"])}


@flow(name="audit")
def audit(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The selected mask against full fine-tuning, each PEFT method unmasked and the mitigations."""
    p, r, _ = _setup(params_path, root)
    return audit_task(p, str(r))


@task(cache_policy=NO_CACHE)
def transfer_task(p: Params, root: str) -> dict:
    L = stages.Layout(Path(root))
    uri, parent, on_record = _logger(p, L.root, "transfer", {
        "arms": ",".join(p.transfer.arms), "seeds": list(p.transfer.seeds), "mask": str(p.transfer.mask or L.selected),
        "n_train": p.transfer.n_train, "n_test": p.transfer.n_test})
    with bars() as progress:
        res = A.run_transfer(p, L, progress=progress, on_record=on_record)
    tracking.log_files(uri, p.tracking.experiment, L.root, parent, [res["md"], res["html"], res["metrics"], *res["figures"]],
                       metrics={"n_records": len(res["records"])}, finish=True)
    return {"md": str(res["md"]), "html": str(res["html"]), "metrics": str(res["metrics"])}


@flow(name="transfer")
def transfer(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The saved mask on the transfer dataset (CT/MR slices) against full FT and the unmasked method."""
    p, r, _ = _setup(params_path, root)
    return transfer_task(p, str(r))


@task(cache_policy=NO_CACHE)
def release_task(p: Params, root: str) -> dict:
    L = stages.Layout(Path(root))
    summary = R.build_release(p, L)
    uri = tracking.tracking_uri(p.tracking.mlflow_uri, L.root)
    parent = tracking.parent_run(uri, p.tracking.experiment, L.root, kind="release", name=p.search.study_name,
                                 params={"seed": p.release.seed, "n_prompts": p.release.n_prompts,
                                         "per_prompt": p.release.per_prompt, "pixel_guard": p.release.pixel_guard})
    out = L.root / "release"
    tracking.log_files(uri, p.tracking.experiment, L.root, parent, [out / "summary.json", out / "manifest.csv"],
                       metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, finish=True)
    return summary


@flow(name="release")
def release(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """A synthetic dataset from models/final, every sample too close to a training image excluded."""
    p, r, _ = _setup(params_path, root)
    return release_task(p, str(r))
