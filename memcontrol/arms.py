"""One arm: fine-tune the base model with a mask on some rows, save the adapter, score it.

Every trial of the search, the Stage-2 model, full fine-tuning and every audit arm is an arm. An
arm's record (`<out_dir>/metrics.json`, written last) holds the key it was computed under, and a
rerun reuses it when the key is unchanged (memcontrol/reuse.py). The training rows of each use
are here too: the inner loop's memorization-inducing set and Stage 2's."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memcontrol import tuning
from memcontrol.base_model import load_base
from memcontrol.config import OBJECTIVES, Params
from memcontrol.data.manifest import memorization_training_set
from memcontrol.evaluate import EvalContext, evaluate
from memcontrol.mitigations import hook_stats
from memcontrol.progress import Progress, ticker
from memcontrol.report import save_image
from memcontrol.reuse import file_digest, finished, make_key
from memcontrol.train import finetune, resolve_device
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout, write_json

log = logging.getLogger(__name__)

# What an arm's result depends on besides its explicit inputs: the code of this module and all it
# imports, and these params sections (the mask, steps, batch size and seed are keyed apart).
ARM_CODE = (__name__,)
ARM_SECTIONS = ("train", "sample", "metrics", "data", "model")


def input_digests(layout: Layout) -> dict[str, str]:
    """Content digests of what every arm reads: the base model and the reference data."""
    return {"base": file_digest(layout.base), "reference": file_digest(layout.reference)}


def search_rows(params: Params, ctx: EvalContext) -> pd.DataFrame:
    """The memorization-inducing training set of the inner loop (docs/paper.md §2.2)."""
    return memorization_training_set(ctx.df, data_size_ratio=params.data.data_size_ratio,
                                     n_repeats=params.data.n_repeats, seed=params.seed)


def final_rows(params: Params, ctx: EvalContext) -> pd.DataFrame:
    """Stage 2's training set (also the audit's and transfer's): final.data_size_ratio of train + the
    memorization subset x final.n_repeats. On the demo the repeats stand in for the natural duplicates
    of a real dataset such as MIMIC-CXR (docs/data.md)."""
    return memorization_training_set(ctx.df, data_size_ratio=params.final.data_size_ratio,
                                     n_repeats=params.final.n_repeats, seed=params.seed)


def full_mask(params: Params) -> Mask:
    """Full fine-tuning of the whole UNet: the reference-mode form with no blocks (no mask)."""
    return Mask(method="full", blocks=(), bits=(), lr=params.final.full_lr, mode="reference")


def run_arm(
    params: Params,
    layout: Layout,
    ctx: EvalContext,
    mask: Mask,
    out_dir: Path,
    *,
    rows: pd.DataFrame,
    steps: int,
    seed: int,
    progress: Progress = None,
    train_hooks: dict | None = None,
    batch_size: int | None = None,
    extra_key: dict | None = None,
    rungs: tuple[int, ...] = (),
    on_rung: Callable[[int, dict], bool] | None = None,
) -> dict:
    """Fine-tune the base model with `mask` on `rows` (batch_size None: train.batch_size), save the
    adapter, evaluate. `train_hooks` go to `finetune` (mitigations); `extra_key` names whatever else
    the result depends on (e.g. the mitigations' settings).

    Returns the record {"key", "mask", "metrics", "train_info"}, also written to out_dir/metrics.json;
    a finished record with the same key is returned without recomputing.

    `rungs` (multi-fidelity, memcontrol/fidelity.py): after each of these step counts (< steps) the
    model is scored as at the end (the scoring draws no randomness from the training, so the final
    result is the same as without rungs) and the metrics go to record["rungs"][str(step)];
    `on_rung(step, metrics)` returning True stops the run there: record["metrics"] are then that
    rung's and record["stopped_at"] its step."""
    batch_size = batch_size or params.train.batch_size
    hooks = train_hooks or {}
    key = make_key(ARM_CODE, params, ARM_SECTIONS, mask=mask.digest(), steps=steps, batch_size=batch_size, seed=seed,
                   rows=hashlib.sha256("|".join(rows["id"]).encode()).hexdigest()[:12],
                   inputs=input_digests(layout), hooks=sorted(hooks), split=ctx.split, **(extra_key or {}),
                   **({"rungs": sorted(rungs)} if rungs else {}))
    done = out_dir / "metrics.json"
    if (record := finished(done, key)) is not None:
        log.info("reusing finished arm %s", out_dir)
        return record
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(params.train.device)
    bundle = load_base(layout, device)
    torch.manual_seed(seed)  # adapters drawn at init (LoRA A) must not depend on what ran before
    prepared = tuning.apply(bundle.unet, mask)
    t0 = time.perf_counter()
    at_rung: dict[str, dict] = {}
    stopped: list = []  # [(step, metrics, grid, samples)] once on_rung stops the run
    rung_seconds: list[float] = []

    def rung(step: int) -> bool:
        if step not in rungs or step >= steps:
            return False
        t_rung = time.perf_counter()
        metrics, grid, samples = evaluate(bundle, ctx)
        bundle.unet.train()
        rung_seconds.append(time.perf_counter() - t_rung)
        at_rung[str(step)] = metrics
        if on_rung is not None and on_rung(step, metrics):
            stopped.append((step, metrics, grid, samples))
            return True
        return False

    res = finetune(
        bundle.unet, prepared.groups, ctx.encoded.train_data(rows), bundle.scheduler,
        steps=steps, batch_size=batch_size, seed=seed, cfg_dropout=params.train.cfg_dropout,
        grad_clip=params.train.grad_clip, weight_decay=params.train.weight_decay,
        mixed_precision=params.train.mixed_precision, gradient_checkpointing=params.train.gradient_checkpointing,
        device=device, progress=lambda step, _loss: ticker(progress, "fine-tune")(step, steps),
        should_stop=rung if rungs else None, **hooks,
    )
    tuning.save_adapter(out_dir, bundle.unet, mask)
    if stopped:
        _, metrics, grid, samples = stopped[0]
        metrics = dict(metrics)
    else:
        metrics, grid, samples = evaluate(bundle, ctx, progress)
    save_image(grid, out_dir / "grid.png")  # generations over their nearest training images
    save_image(samples, out_dir / "samples.png")  # the held-out prompts' generations
    metrics.update({
        "trainable": int(prepared.trainable),
        "trainable_pct": float(prepared.pct),
        "train_seconds": res.seconds,
        "final_loss": float(np.mean(res.losses[-10:])),
        "wall_seconds": time.perf_counter() - t0,
    })
    # what the run of the hooks counted (Wen: samples dropped; RWA: calls), kept for reuse
    train_info = {"n_rows": len(rows), "n_distinct_images": int(rows["id"].nunique()), **hook_stats(hooks)}
    record = {"key": key, "mask": json.loads(mask.to_json()), "metrics": metrics, "train_info": train_info}
    if rungs:
        record["rungs"] = at_rung
        record["stopped_at"] = stopped[0][0] if stopped else None
        metrics["rung_seconds"] = float(sum(rung_seconds))  # inside train_seconds
        for step, values in at_rung.items():  # the objectives' metrics at each rung, for MLflow and trials.csv
            metrics.update({f"rung{step}.{k}": values[k] for k, _ in OBJECTIVES.values() if k in values})
        if stopped:
            metrics["stopped_at_step"] = stopped[0][0]
    write_json(record, done)
    # the record as a reuse reads it back (keys sorted): a table built from fresh and reused records
    # (trials.csv after a resume) then has one column order
    return json.loads(done.read_text())


def evaluate_base(params: Params, layout: Layout, ctx: EvalContext, progress: Progress = None) -> dict:
    """The base model's own metrics (no fine-tuning): the memorization floor of the model.
    Record reports/base_metrics.json, reused under the same key as an arm's; grid reports/base_grid.png."""
    key = make_key(ARM_CODE, params, ARM_SECTIONS, inputs=input_digests(layout), split=ctx.split)
    out = layout.reports / "base_metrics.json"
    if (record := finished(out, key)) is not None and (layout.reports / "base_grid.png").exists():
        return record["metrics"]
    metrics, grid, _ = evaluate(load_base(layout), ctx, progress)
    layout.reports.mkdir(parents=True, exist_ok=True)
    save_image(grid, layout.reports / "base_grid.png")
    write_json({"key": key, "metrics": metrics}, out)
    return metrics
