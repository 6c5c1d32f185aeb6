"""Prefect flow `export`: the Stage-2 model of one seed as a diffusers folder with a model card
(memcontrol/export.py, memcontrol/cards.py), logged to MLflow as the `final` run's `model/` folder."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from memcontrol.base_model import base_model_path
from memcontrol.cards import model_card
from memcontrol.config import Params, load_params
from memcontrol.export import export_model
from memcontrol.tuning import MASK_FILE
from memcontrol.workdir import Layout
from memcontrol.errors import MissingInput
from tasks import tracking


@task(cache_policy=NO_CACHE)
def export_task(params: Params, root: str, out: str, seed: int) -> str:
    layout = Layout(Path(root))
    adapter = layout.final / f"seed{seed}"
    if not (adapter / MASK_FILE).exists():
        raise MissingInput(f"{adapter}: no final model for seed {seed} (final.seeds: {list(params.final.seeds)}); "
                                "run `memcontrol finetune` first")
    base_model = str(params.model.path) if params.model.path is not None else "models/base"
    card = model_card(params, layout, adapter, seed=seed, base_model=base_model)  # before writing: a missing input stops here
    folder = export_model(base_model_path(layout), adapter, Path(out), card=card, record={"seed": seed})
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, layout.root)
    record = json.loads((adapter / "metrics.json").read_text())
    tracking.log_final_model(uri, params.tracking.experiment, layout.root, name=f"{params.search.study_name}-seed{seed}",
                             folder=folder, record=record)
    return str(folder)


@flow(name="export")
def export(params_path: str = "params.yaml", root: str | None = None, out: str = "models/export",
           seed: int | None = None) -> str:
    """Merge the final adapter of `seed` (default: the first of final.seeds) into a diffusers folder at `out`."""
    params = load_params(params_path)
    workdir = Path(root or params.workdir).resolve()
    return export_task(params, str(workdir), str(Path(out).resolve()), params.final.seeds[0] if seed is None else seed)
