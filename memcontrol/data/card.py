"""Helpers for the data card (docs/data.md): an example grid per label, counts, pixel similarity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from memcontrol.data.images import read_image, resize_crop, save_png
from memcontrol.data.manifest import image_paths, validate_manifest

# grid rows: (title, predicate on the manifest)
GRID_ROWS = (
    ("DRR normal", lambda d: d["source"].str.startswith("drr") & (d["label"] == "normal")),
    ("DRR consolidation", lambda d: d["label"].str.startswith("consolidation")),
    ("DRR effusion", lambda d: d["label"].str.startswith("effusion")),
    ("DRR cardiomegaly", lambda d: d["label"] == "cardiomegaly"),
    ("DRR nodule", lambda d: d["label"].str.startswith("nodule_")),
    ("real normal", lambda d: ~d["source"].str.startswith("drr") & (d["label"] == "normal")),
    ("real pneumonia", lambda d: d["label"] == "pneumonia"),
    ("real adult (RG1)", lambda d: d["label"] == "nodules"),
)


def example_grid(manifest: pd.DataFrame, root: str | os.PathLike, out_path: str | os.PathLike, *,
                 per_row: int = 6, thumb: int = 96, seed: int = 0) -> Path:
    """Write a grayscale PNG: one row per GRID_ROWS entry, `per_row` seeded random examples each,
    with the row title and each image's label tag. Returns out_path."""
    df = validate_manifest(manifest)
    paths = image_paths(df, root)
    rng = np.random.default_rng(seed)
    margin, caption = 112, 12
    h = thumb + caption
    canvas = np.zeros((h * len(GRID_ROWS), margin + per_row * thumb), dtype=np.uint8)
    texts = []
    for r, (title, pred) in enumerate(GRID_ROWS):
        idx = np.flatnonzero(pred(df).to_numpy())
        if len(idx) > per_row:
            idx = np.sort(rng.choice(idx, per_row, replace=False))
        texts.append((4, r * h + thumb // 2 - 6, title))
        for c, i in enumerate(idx):
            img = resize_crop(read_image(paths[i]), thumb)
            if img.ndim == 3:
                img = img.mean(axis=2)
            x = margin + c * thumb
            canvas[r * h: r * h + thumb, x: x + thumb] = np.round(img * 255).astype(np.uint8)
            tag = df["label"][i].replace("consolidation_", "cons. ").replace("effusion_", "eff. ")
            texts.append((x + 2, r * h + thumb, tag))
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for x, y, t in texts:
        draw.text((x, y), t, fill=255, font=font)
    save_png(np.asarray(im), out_path)
    return Path(out_path)


def counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows per (split, subset, label, source kind); source kind drops the report uid."""
    df = validate_manifest(manifest)
    kind = df["source"].str.split(":").str[0]
    return (df.assign(source=kind).groupby(["split", "subset", "label", "source"]).size()
            .rename("n").reset_index())


def pixel_correlation(a: list, b: list | None = None, *, size: int = 64) -> dict:
    """Pearson correlation of grayscale pixels (images resized to size x size) between the images
    of `a` (all pairs) or between `a` and `b`. Returns mean, 5/50/95th percentiles, and the mean
    over `a` of the highest correlation with another image (nearest neighbour)."""
    def load(paths):
        x = []
        for p in paths:
            img = resize_crop(read_image(p), size)
            x.append((img.mean(axis=2) if img.ndim == 3 else img).ravel())
        x = np.stack(x).astype(np.float64)
        x -= x.mean(axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        return x

    xa = load(a)
    if b is None:
        c = xa @ xa.T
        np.fill_diagonal(c, -np.inf)
        vals = c[np.triu_indices(len(xa), 1)]
    else:
        c = xa @ load(b).T
        vals = c.ravel()
    return {"mean": float(vals.mean()), "p5": float(np.percentile(vals, 5)),
            "p50": float(np.percentile(vals, 50)), "p95": float(np.percentile(vals, 95)),
            "nn_mean": float(c.max(axis=1).mean())}
