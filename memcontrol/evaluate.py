"""Scoring one model, the same way for every trial and arm: generate for the memorization prompts
(several seeds each) and for held-out prompts, embed (copy detector and quality embedder), search the reference index, score.

`EvalContext` loads what is the same for every evaluation (reference index, threshold, cached
latents and text states, embedder) once; `evaluate` returns the metrics (docs/metrics.md), a grid
of generations above their nearest training images and a grid of the held-out prompts' samples
(what the quality metrics measure)."""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from PIL import Image

from memcontrol.config import OBJECTIVES, Params
from memcontrol.data.images import load_images
from memcontrol.embed import Embedder
from memcontrol.encode import Encoded, image_paths
from memcontrol.memorization import amd, nn_scores, noise_norm
from memcontrol.models.bundle import Bundle
from memcontrol.progress import Progress, ticker
from memcontrol.quality import fid_kid
from memcontrol.reference import make_embedder, make_quality_embedder
from memcontrol.reference_index import ReferenceIndex
from memcontrol.report import image_grid, pair_grid
from memcontrol.sample import generate, item_seed
from memcontrol.workdir import Layout, read_manifest, rows_of


EVAL_SPLITS = ("val", "test")


class EvalContext:
    """Everything an evaluation needs that is the same for every trial, loaded once.

    `split` is where quality is measured: "val" for the search's trials (and its selection rule),
    "test" for Stage 2, the audit and every reported number, so the mask is never chosen on the
    images it is reported on."""

    def __init__(self, params: Params, layout: Layout, split: str = "test"):
        if split not in EVAL_SPLITS:
            raise ValueError(f"EvalContext: split must be one of {EVAL_SPLITS}, got {split!r}")
        self.params, self.layout, self.split = params, layout, split
        self.df = read_manifest(layout)
        self.ref = layout.reference
        self.ids = json.loads((self.ref / "ids.json").read_text())
        self.threshold = json.loads((self.ref / "threshold.json").read_text())

    @cached_property
    def encoded(self) -> Encoded:
        return Encoded.load(self.ref / "encoded.safetensors")

    @cached_property
    def index(self) -> ReferenceIndex:
        return ReferenceIndex.load(self.ref / "index")

    @cached_property
    def train_feats(self) -> np.ndarray:
        return np.load(self.ref / "train_feats.npy")

    @cached_property
    def heldout_feats(self) -> np.ndarray:
        """(n, d) quality-embedder features of this context's held-out split: FID/KID's real side."""
        return np.load(self.ref / f"{self.split}_quality_feats.npy")

    @cached_property
    def embedder(self) -> Embedder:
        """The copy detector's embedder (the index's)."""
        return make_embedder(self.params)

    @cached_property
    def quality_embedder(self) -> Embedder:
        return make_quality_embedder(self.params)

    @cached_property
    def mem_rows(self) -> pd.DataFrame:
        return rows_of(self.df, "train", "mem")

    @cached_property
    def quality_rows(self) -> pd.DataFrame:
        heldout = rows_of(self.df, self.split)
        n = min(self.params.sample.n_quality, len(heldout))
        return heldout.sample(n=n, random_state=self.params.seed).reset_index(drop=True)

    def train_images(self, ids: list[str], size: int) -> torch.Tensor:
        """(n, 3, size, size) float in [0, 1]: the manifest images of `ids`, in that order."""
        rows = self.df.set_index("id").loc[ids].reset_index()
        return (load_images(image_paths(rows, self.layout.manifest.parent), size) + 1) / 2


def evaluate(bundle: Bundle, ctx: EvalContext, progress: Progress = None) -> tuple[dict, Image.Image, Image.Image]:
    """Generate for the memorization-subset prompts (several seeds each) and for held-out prompts,
    embed (the first with the copy detector, the second with the quality embedder), then: FAISS nearest-training similarity (memorization), FID/KID (quality) and the
    noise-norm proxy. Returns (metrics, nearest-neighbour grid, sample grid of the held-out prompts)."""
    params, enc = ctx.params, ctx.encoded
    sample = params.sample
    mem, qual = ctx.mem_rows, ctx.quality_rows
    mem_p = enc.prompt_index(mem["prompt"].tolist())
    qual_p = enc.prompt_index(qual["prompt"].tolist())
    text = torch.cat([enc.text[mem_p].repeat_interleave(sample.mem_seeds, 0), enc.text[qual_p]])
    seeds = [item_seed(sample.seed, i, k) for i in range(len(mem)) for k in range(sample.mem_seeds)]
    seeds += [item_seed(sample.seed + 1, i, 0) for i in range(len(qual))]
    n_mem = len(mem) * sample.mem_seeds
    tick = ticker(progress, "generate")
    done = [0]

    def on_batch(n_done: int) -> None:
        done[0] += n_done
        tick(done[0], len(seeds))

    imgs = generate(bundle, text, seeds, steps=sample.steps, guidance=sample.guidance, batch_size=sample.batch_size,
                    null_text=enc.null_text, progress=on_batch)
    mem_f, qual_f = ctx.embedder.embed(imgs[:n_mem]), ctx.quality_embedder.embed(imgs[n_mem:])

    sims, idx = ctx.index.search(mem_f, k=1)
    sims, idx = sims[:, 0], idx[:, 0]
    thr = ctx.threshold["threshold"]
    scores = nn_scores(sims, thr)
    nearest_ids = [ctx.ids["train"][i] for i in idx]
    own_ids = np.repeat(mem["id"].to_numpy(), sample.mem_seeds)
    own = (np.asarray(nearest_ids) == own_ids) & (sims > thr)

    heldout_pos = {k: i for i, k in enumerate(ctx.ids[ctx.split])}
    real_f = ctx.heldout_feats[[heldout_pos[i] for i in qual["id"]]]
    quality = fid_kid(real_f, qual_f, kid_subset_size=min(params.metrics.kid_subset_size, len(qual)), seed=params.seed)

    img_idx = enc.image_index(mem["id"].tolist())
    noise = noise_norm(bundle.unet, enc.latent_mean[img_idx], enc.text[mem_p], enc.null_text,
                       bundle.scheduler, seed=sample.seed)
    metrics = {
        "mem.flagged_rate": scores.flagged_rate,
        "mem.mean_sim": scores.mean_sim,
        "mem.p95_sim": scores.p95_sim,
        "mem.own_match_rate": float(own.mean()),
        "mem.amd": float(amd(mem_f, ctx.train_feats)),
        "mem.n": int(n_mem),
        "mem.threshold": float(thr),
        "quality.fid": float(quality["fid"]),
        "quality.kid_mean": float(quality["kid_mean"]),
        "quality.kid_std": float(quality["kid_std"]),
        "quality.n": int(len(qual)),
        "noise_norm.max": float(noise["max"]),
        "noise_norm.mean": float(noise["mean"]),
    }
    first = np.arange(0, n_mem, sample.mem_seeds)  # one generation per memorization prompt
    grid = pair_grid(imgs[:n_mem][first], ctx.train_images([nearest_ids[i] for i in first], bundle.resolution),
                     sims[first], cols=min(8, len(first)), scale=2)
    samples = image_grid(imgs[n_mem:], cols=min(8, len(qual)), scale=2)
    return metrics, grid, samples


def objective_values(params: Params, metrics: dict) -> list[float]:
    """The study's objective values (search.objectives, in order) from an arm's metrics."""
    return [float(metrics[OBJECTIVES[o][0]]) for o in params.search.objectives]
