"""Prefect tasks: thin wrappers over memcontrol.stages. Inputs are the typed params, the working
directory and digests; outputs are paths and metric dicts (never models or tensors).

Stage tasks carry NO_CACHE: whether a stage reruns is DVC's decision (dvc.yaml), and their
outputs are files. The trial task caches on its inputs, which include the digests of the base
model and the reference data, so a rerun after a crash skips finished trials."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from memcontrol import stages
from memcontrol.config import Params
from memcontrol.tuning import Mask
from tasks.progress import bars


def _layout(root: str) -> stages.Layout:
    return stages.Layout(Path(root))


@task(cache_policy=NO_CACHE)
def prepare(p: Params, root: str) -> str:
    """Ingest + validate the dataset into the manifest."""
    return str(stages.prepare(p, _layout(root)))


@task(cache_policy=NO_CACHE)
def base(p: Params, root: str) -> str:
    """Pretrain the tiny base model, or check and point at the user's diffusers folder."""
    with bars() as progress:
        return str(stages.base(p, _layout(root), progress))


@task(cache_policy=NO_CACHE)
def reference(p: Params, root: str) -> str:
    """Encode the dataset, build the FAISS index, calibrate the threshold."""
    return str(stages.reference(p, _layout(root)))


@task(cache_policy=NO_CACHE)
def digest(path: str) -> str:
    """Content digest of a file or folder, for the cache keys of the tasks that read it."""
    return stages.file_digest(Path(path))


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, tags=["gpu"])
def run_arm(p: Params, root: str, mask_json: str, out_dir: str, *, arm: str, seed: int, steps: int,
            data_digest: str) -> dict:
    """Fine-tune with one mask and evaluate it; data_digest is there only to key the cache."""
    L = _layout(root)
    ctx = stages.EvalContext(p, L)
    trial = arm == "trial"
    rows = stages.search_rows(p, ctx) if trial else stages.final_rows(p, ctx)
    with bars() as progress:
        return stages.run_arm(p, L, ctx, Mask.from_json(mask_json), Path(out_dir), rows=rows, steps=steps,
                              seed=seed, progress=progress, batch_size=None if trial else p.final.batch_size)


@task(cache_policy=NO_CACHE)
def evaluate_base(p: Params, root: str) -> dict:
    """The base model's own metrics (no fine-tuning): the memorization floor of the model."""
    L = _layout(root)
    out = L.reports / "base_metrics.json"
    if out.exists():
        return json.loads(out.read_text())
    ctx = stages.EvalContext(p, L)
    with bars() as progress:
        metrics, grid = stages.evaluate(stages.load_base(L), ctx, progress)
    L.reports.mkdir(parents=True, exist_ok=True)
    stages.save_image(grid, L.reports / "base_grid.png")
    stages.write_json(metrics, out)
    return metrics
