"""Prefect tasks: thin wrappers over the library's stages. Inputs are the typed params and the
working directory; outputs are paths and metric dicts (never models or tensors).

Every task carries NO_CACHE: Prefect does not decide what is reused. Whether a stage reruns is
DVC's decision (dvc.yaml); whether a finished arm is reused is the arm's own record
(memcontrol/reuse.py, docs/architecture.md "Reuse of finished work")."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from memcontrol import arms, base_model, prepare as prepare_stage, reference as reference_stage, study_storage
from memcontrol.config import Params
from memcontrol.evaluate import EvalContext
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout
from tasks.progress import bars


@task(cache_policy=NO_CACHE)
def prepare(params: Params, root: str) -> str:
    """Ingest + validate the dataset into the manifest."""
    return str(prepare_stage.prepare(params, Layout(Path(root))))


@task(cache_policy=NO_CACHE)
def base(params: Params, root: str, force_pretrain: bool = False) -> str:
    """The tiny base model (committed copy or pretrained), or check and point at the user's folder."""
    with bars() as progress:  # labels "base: VAE", "base: UNet"
        return str(base_model.base(params, Layout(Path(root)), progress, force_pretrain=force_pretrain))


@task(cache_policy=NO_CACHE)
def reference(params: Params, root: str) -> str:
    """Encode the dataset, build the FAISS index, calibrate the threshold."""
    return str(reference_stage.reference(params, Layout(Path(root))))


@task(cache_policy=NO_CACHE)
def run_arm(params: Params, root: str, mask_json: str, out_dir: str, *, arm: str, seed: int, steps: int,
            rungs: tuple[int, ...] = (), on_rung=None) -> dict:
    """Fine-tune with one mask and evaluate it (arm "trial": the inner loop's rows and batch size;
    otherwise Stage 2's). A finished arm with the same key is reused by the library. `rungs` and
    `on_rung`: scored at intermediate steps and maybe stopped there (memcontrol/fidelity.py)."""
    layout = Layout(Path(root))
    trial = arm == "trial"
    ctx = EvalContext(params, layout, split="val" if trial else "test")
    rows = arms.search_rows(params, ctx) if trial else arms.final_rows(params, ctx)
    with bars(f"{arm} {Path(out_dir).name}: ") as progress:
        return arms.run_arm(params, layout, ctx, Mask.from_json(mask_json), Path(out_dir), rows=rows, steps=steps,
                            seed=seed, progress=progress, batch_size=None if trial else params.final.batch_size,
                            rungs=tuple(rungs), on_rung=on_rung)


@task(cache_policy=NO_CACHE)
def evaluate_base(params: Params, root: str) -> dict:
    """The base model's own metrics (no fine-tuning): the memorization floor of the model."""
    layout = Layout(Path(root))
    with bars("base model: ") as progress:
        return arms.evaluate_base(params, layout, EvalContext(params, layout), progress)


@task(cache_policy=NO_CACHE)
def run_trial(params: Params, root: str, mask_json: str, out_dir: str, *, study_url: str, trial_id: int) -> dict:
    """One search trial on a Dask worker (search.workers > 1, flows/parallel.py): torch on one
    thread, and Optuna's heartbeat for the trial in the study while it runs (a worker killed mid-trial
    stops beating: the search fails the trial and runs it once more, memcontrol/study_storage.py).

    No Prefect tags here or on `run_arm`: a tagged task run first takes a concurrency lease from the
    Prefect API, and two trials starting at once waited for it (benchmarks/scale_out.py,
    `batch_of_4_overrun_s`); Dask's `trial` resource is what bounds the trials per worker."""
    import torch
    from distributed import get_worker

    torch.set_num_threads(1)
    try:
        worker = get_worker().address
    except ValueError:  # not on a Dask worker
        worker = None
    with study_storage.heartbeat(study_url, trial_id, params.search.heartbeat_interval, worker=worker):
        return run_arm.fn(params, root, mask_json, out_dir, arm="trial", seed=params.seed, steps=params.train.steps)
