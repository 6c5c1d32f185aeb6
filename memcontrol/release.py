"""A privacy-screened synthetic dataset from the final model.

Generate images for training prompts (memorization prompts first: the likeliest to be copied),
find each one's nearest training image in the embedder's FAISS index, and **exclude** every sample
whose similarity passes the memorization threshold (data/reference/threshold.json, the same
`sim > threshold` rule that flags memorization in the evaluation). With the pixel guard on, a sample
whose tile distance (memcontrol.extraction) to any training image is below the calibrated link
threshold is excluded too, so an exact or near-exact training image can never be released even if
the embedder misses it. The manifest records, for every sample, its nearest training image (id and
similarity), the pixel-nearest one (id and distance) and whether it was released.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memcontrol import atomic, tuning
from memcontrol.audit.attack import tile_threshold as calibrated_tile_threshold
from memcontrol.base_model import load_base
from memcontrol.cards import dataset_card
from memcontrol.config import Params
from memcontrol.data.images import save_png
from memcontrol.evaluate import EvalContext
from memcontrol.extraction import tile_distance
from memcontrol.reference_index import ReferenceIndex
from memcontrol.sample import generate, item_seed
from memcontrol.train import resolve_device
from memcontrol.workdir import Layout, rows_of, write_json, write_text
from memcontrol.errors import MissingInput

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["sample_id", "file", "prompt", "prompt_kind", "seed", "nn_train_id", "nn_sim", "pixel_nn_train_id",
                    "pixel_distance", "flag_embedding", "flag_pixel", "released", "sha256"]


def screen(
    images: torch.Tensor,
    feats: np.ndarray,
    index: ReferenceIndex,
    train_ids: list[str],
    threshold: float,
    *,
    train_images: torch.Tensor | None = None,
    tile_threshold: float | None = None,
    tiles: int = 4,
) -> pd.DataFrame:
    """Decide which candidate samples may be released.

    Args:
        images: (n, 3, H, W) float in [0, 1] candidates.
        feats: (n, d) their raw embeddings (same embedder as the index).
        index: the training set's reference index; train_ids: its row ids, in index order.
        threshold: flag when the nearest-training cosine similarity is > threshold.
        train_images: (m, 3, H, W) float in [0, 1] training images for the pixel guard (None: off).
        tile_threshold: flag when the tile distance to a training image is < this.

    Returns:
        DataFrame (n rows): nn_train_id, nn_sim, pixel_nn_train_id, pixel_distance, flag_embedding,
        flag_pixel, released.
    """
    if len(images) != len(feats):
        raise ValueError(f"screen: {len(images)} images but {len(feats)} embeddings")
    sims, idx = index.search(np.asarray(feats, dtype=np.float32), k=1)
    sims, idx = sims[:, 0].astype(float), idx[:, 0]
    out = pd.DataFrame({"nn_train_id": [train_ids[i] for i in idx], "nn_sim": sims})
    out["flag_embedding"] = sims > threshold
    if train_images is not None:
        if tile_threshold is None:
            raise ValueError("screen: the pixel guard needs tile_threshold")
        d = np.concatenate([tile_distance(images[i:i + 64], train_images, tiles) for i in range(0, len(images), 64)])
        j = d.argmin(axis=1)
        out["pixel_nn_train_id"] = [train_ids[k] for k in j]
        out["pixel_distance"] = d[np.arange(len(d)), j]
        out["flag_pixel"] = out["pixel_distance"] < tile_threshold
    else:
        out["pixel_nn_train_id"], out["pixel_distance"], out["flag_pixel"] = "", np.nan, False
    out["released"] = ~(out["flag_embedding"] | out["flag_pixel"])
    return out


def release_prompts(ctx: EvalContext, n: int, seed: int) -> pd.DataFrame:
    """Distinct training prompts: every memorization prompt, then a seeded sample of the others, `n` in all."""
    train = rows_of(ctx.df, "train")
    mem = train[train["subset"] == "mem"]["prompt"].drop_duplicates().tolist()
    other = train[train["subset"] != "mem"]["prompt"].drop_duplicates()
    other = other[~other.isin(mem)].tolist()
    pick = np.random.default_rng(seed).permutation(len(other))[: max(0, n - len(mem))]
    prompts = mem[:n] + [other[i] for i in sorted(pick)]
    kinds = ["memorization"] * min(n, len(mem)) + ["train"] * (len(prompts) - min(n, len(mem)))
    return pd.DataFrame({"prompt": prompts, "prompt_kind": kinds})


def build_release(params: Params, layout: Layout, out_dir: Path | None = None, *,
                  tile_threshold: float | None = None) -> dict:
    """Generate, screen and write the release under `out_dir` (default <workdir>/release):
    images/<sample_id>.png for released samples only, manifest.csv + manifest.parquet for all
    samples, summary.json with the counts, README.md the dataset card (memcontrol/cards.py). Returns the summary."""
    r = params.release
    out_dir = out_dir or layout.root / "release"
    adapter = layout.final / f"seed{r.seed}"
    if not (adapter / tuning.MASK_FILE).exists():
        raise MissingInput(f"release: no final model at {adapter} (run `memcontrol finetune`; release.seed={r.seed})")
    ctx = EvalContext(params, layout)
    bundle = load_base(layout, resolve_device(params.train.device))
    mask = tuning.load_adapter(adapter, bundle.unet)
    res = bundle.resolution
    pr = release_prompts(ctx, r.n_prompts, params.seed)
    enc = ctx.encoded
    text = bundle.encode_prompts(pr["prompt"].tolist()).repeat_interleave(r.per_prompt, 0)
    seeds = [item_seed(params.sample.seed + 7, i, k) for i in range(len(pr)) for k in range(r.per_prompt)]
    imgs = generate(bundle, text, seeds, steps=params.sample.steps, guidance=params.sample.guidance,
                    batch_size=params.sample.batch_size, null_text=enc.null_text)
    feats = ctx.embedder.embed(imgs)
    thr = float(ctx.threshold["threshold"])
    train_imgs, tthr = None, None
    tfile = out_dir / "tile_threshold.json"
    if r.pixel_guard:
        tthr = tile_threshold if tile_threshold is not None else calibrated_tile_threshold(params, ctx, tfile, res)
        train_imgs = ctx.train_images(list(ctx.ids["train"]), res)
    if tile_threshold is not None or not r.pixel_guard or params.audit.extraction.threshold != "calibrated":
        write_json({"threshold": tthr, "pixel_guard": r.pixel_guard}, tfile)  # always there (a DVC out)
    table = screen(imgs, feats, ctx.index, list(ctx.ids["train"]), thr, train_images=train_imgs,
                   tile_threshold=tthr, tiles=params.audit.extraction.tiles)
    table.insert(0, "sample_id", [f"syn-{i:05d}-{k}" for i in range(len(pr)) for k in range(r.per_prompt)])
    table.insert(1, "prompt", np.repeat(pr["prompt"].to_numpy(), r.per_prompt))
    table.insert(2, "prompt_kind", np.repeat(pr["prompt_kind"].to_numpy(), r.per_prompt))
    table.insert(3, "seed", seeds)
    files, hashes = [], []
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):  # a rerun must not leave a sample that is now excluded
        old.unlink()
    for i, row in table.iterrows():
        if row["released"]:
            data = save_png(imgs[i], img_dir / f"{row['sample_id']}.png")
            files.append(f"images/{row['sample_id']}.png")
            hashes.append(hashlib.sha256(data).hexdigest())
        else:
            files.append("")
            hashes.append("")
    table["file"], table["sha256"] = files, hashes
    table = table[MANIFEST_COLUMNS]
    for name, write in (("manifest.csv", lambda f: table.to_csv(f, index=False)),
                        ("manifest.parquet", lambda f: table.to_parquet(f, index=False))):
        with atomic.atomic_path(out_dir / name) as tmp:
            write(tmp)
    by_kind = table.groupby("prompt_kind")["released"].agg(["size", "sum"])
    summary = {
        "n_generated": int(len(table)),
        "n_released": int(table["released"].sum()),
        "n_excluded": int((~table["released"]).sum()),
        "n_excluded_embedding": int(table["flag_embedding"].sum()),
        "n_excluded_pixel": int(table["flag_pixel"].sum()),
        "excluded_by_kind": {k: int(v["size"] - v["sum"]) for k, v in by_kind.iterrows()},
        "generated_by_kind": {k: int(v["size"]) for k, v in by_kind.iterrows()},
        "threshold": thr,
        "tile_threshold": tthr,
        "embedder": ctx.threshold.get("embedder"),
        "model": str(adapter),
        "mask": {"method": mask.method, "enabled_blocks": list(mask.enabled())},
        "prompts": int(len(pr)),
        "per_prompt": r.per_prompt,
    }
    write_json(summary, out_dir / "summary.json")
    write_text(dataset_card(params, layout, out_dir), out_dir / "README.md")  # the dataset card, from summary.json
    log.info("release: %d generated, %d released, %d excluded", summary["n_generated"], summary["n_released"],
             summary["n_excluded"])
    return summary


def check_no_training_images(release_dir: Path, train_images: torch.Tensor, train_sha256: set[str]) -> None:
    """Raise if a released file is byte-identical to a training file or pixel-identical (at the
    release's resolution) to a training image. train_images: (m, 3, H, W) float in [0, 1]."""
    from memcontrol.data.images import load_images

    man = pd.read_csv(release_dir / "manifest.csv", keep_default_na=False)
    rel = man[man["released"].astype(str).str.lower() == "true"]
    bad = set(rel["sha256"]) & train_sha256
    if bad:
        raise AssertionError(f"{release_dir}: released files identical to training files: {sorted(bad)[:3]}")
    if len(rel):
        size = train_images.shape[-1]
        x = (load_images([release_dir / f for f in rel["file"]], size) + 1) / 2
        d = torch.cdist(x.flatten(1).double(), train_images.flatten(1).double()) / np.sqrt(x[0].numel())
        if (d < 1.0 / 255).any():
            raise AssertionError(f"{release_dir}: a released image equals a training image pixel for pixel")
