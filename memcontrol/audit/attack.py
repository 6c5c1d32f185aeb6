"""The extraction attack (memcontrol/extraction.py, docs/paper.md §4.4) run on one fine-tuned arm,
and the attack's link threshold calibrated on the training images."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from memcontrol import tuning
from memcontrol.base_model import load_base
from memcontrol.config import Params
from memcontrol.evaluate import EvalContext
from memcontrol.extraction import calibrate_tile_threshold, extraction_attack
from memcontrol.report import pair_grid, save_image
from memcontrol.reuse import finished, make_key
from memcontrol.sample import generate, item_seed
from memcontrol.train import resolve_device
from memcontrol.workdir import Layout, write_json


def tile_threshold(params: Params, ctx: EvalContext, out: Path, resolution: int) -> float:
    """Link threshold of the extraction attack: fixed, or the `quantile` of the tile distances between
    distinct training images at the model's resolution (a record in `out`, reused under its key)."""
    ext = params.audit.extraction
    if ext.threshold != "calibrated":
        return float(ext.threshold)
    ids = list(ctx.ids["train"])
    key = make_key((__name__,), params, (), ids=ids, quantile=ext.quantile, tiles=ext.tiles, resolution=resolution)
    if (record := finished(out, key)) is not None:
        return float(record["threshold"])
    thr = calibrate_tile_threshold(ctx.train_images(ids, resolution), ext.quantile, tiles=ext.tiles)
    write_json({"key": key, "threshold": thr, "quantile": ext.quantile, "n_images": len(ids),
                "resolution": resolution}, out)
    return thr


def extraction_eval(params: Params, layout: Layout, ctx: EvalContext, arm_dir: Path, *, threshold: float,
                    top: int) -> tuple[dict, Image.Image]:
    """Reload the arm's adapter on the base model, generate `audit.extraction.per_prompt` images per
    memorization prompt (the first `sample.mem_seeds` are the very images `evaluate` scored), run the
    extraction attack against each prompt's training image and draw the `top` most similar
    generations above their nearest training images. Returns (metrics, grid)."""
    ext, sample = params.audit.extraction, params.sample
    bundle = load_base(layout, resolve_device(params.train.device))
    tuning.load_adapter(arm_dir, bundle.unet)
    enc, mem = ctx.encoded, ctx.mem_rows
    n = ext.per_prompt
    text = enc.text[enc.prompt_index(mem["prompt"].tolist())].repeat_interleave(n, 0)
    seeds = [item_seed(sample.seed, i, k) for i in range(len(mem)) for k in range(n)]
    imgs = generate(bundle, text, seeds, steps=sample.steps, guidance=sample.guidance, batch_size=sample.batch_size,
                    null_text=enc.null_text)
    res = bundle.resolution
    own = ctx.train_images(mem["id"].tolist(), res)
    attack = extraction_attack(list(imgs.view(len(mem), n, *imgs.shape[1:])), list(own), tiles=ext.tiles,
                               threshold=threshold, min_component=ext.min_component)
    sims, idx = ctx.index.search(ctx.embedder.embed(imgs), k=1)
    sims, idx = sims[:, 0], idx[:, 0]
    order = np.argsort(-sims, kind="stable")[: min(top, len(sims))]
    nearest = ctx.train_images([ctx.ids["train"][i] for i in idx[order]], res)
    grid = pair_grid(imgs[order], nearest, sims[order], cols=min(8, len(order)), scale=2)
    metrics = {
        "extraction.n_prompts": attack.n_prompts,
        "extraction.n_memorized": attack.n_memorized,
        "extraction.n_extracted": attack.n_extracted,
        "extraction.memorized_rate": attack.memorized_rate,
        "extraction.extracted_rate": attack.extracted_rate,
        "extraction.threshold": float(threshold),
        "extraction.per_prompt": n,
        "mem.max_sim": float(sims.max()),
    }
    return metrics, grid


def attack_arm(params: Params, layout: Layout, ctx: EvalContext, arm_dir: Path, *, arm_key: dict, threshold: float,
               aux: dict, info: dict) -> dict:
    """The extraction attack on the arm in `arm_dir` (trained under `arm_key`): its metrics, with
    nearest.png and the record audit.json, reused while the arm and the attack settings are unchanged."""
    aux = {**aux, "extraction": params.audit.extraction.model_dump(mode="json"),
           "extraction_threshold": round(threshold, 6), "top": params.audit.grid_top}
    key = make_key((__name__,), params, (), arm=arm_key, aux=aux)
    side = arm_dir / "audit.json"
    if (record := finished(side, key)) is not None and (arm_dir / "nearest.png").exists():
        return record["metrics"]
    t0 = time.perf_counter()
    metrics, grid = extraction_eval(params, layout, ctx, arm_dir, threshold=threshold, top=params.audit.grid_top)
    metrics["extraction.seconds"] = time.perf_counter() - t0
    save_image(grid, arm_dir / "nearest.png")
    write_json({"key": key, "aux": aux, "metrics": metrics, "info": info}, side)
    return metrics
