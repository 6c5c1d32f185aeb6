"""Helpers for the data card (docs/data.md): an example grid per row kind, counts, similarity statistics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from memcontrol.data.images import read_image, resize_crop, save_png
from memcontrol.data.manifest import image_paths, validate_manifest


def _finetune(d: pd.DataFrame) -> pd.Series:
    """Fine-tuning radiographs (train/val/test) outside the memorization subset."""
    return d["split"].isin(["train", "val", "test"]) & (d["subset"] != "mem")


# grid rows: (title, predicate on the manifest); "\n" breaks a long title
GRID_ROWS = (
    ("CT slices\n(base)", lambda d: (d["split"] == "base") & (d["subset"] == "")),
    ("radiographs\n(codec: VAE\nonly)", lambda d: d["subset"] == "codec"),
    ("DRR normal", lambda d: _finetune(d) & (d["label"] == "normal")),
    ("DRR\nconsolidation", lambda d: _finetune(d) & d["label"].str.startswith("consolidation_")),
    ("DRR effusion", lambda d: _finetune(d) & d["label"].str.startswith("effusion_")),
    ("DRR\ncardiomegaly", lambda d: _finetune(d) & (d["label"] == "cardiomegaly")),
    ("DRR nodule", lambda d: _finetune(d) & d["label"].str.startswith("nodule_")),
    ("memorization\nsubset (train)", lambda d: d["subset"] == "mem"),
)

_SHORT = (("ct_axial_", ""), ("consolidation_", "cons. "), ("effusion_", "eff. "), ("nodule_", "nodule "),
          ("cardiomegaly", "cardiomeg."))


def _tag(label: str, split: str) -> str:
    for old, new in _SHORT:
        label = label.replace(old, new)
    return label if split in ("base", "train") else f"{label} ({split})"


def example_grid(manifest: pd.DataFrame, root: str | os.PathLike, out_path: str | os.PathLike, *,
                 per_row: int = 6, thumb: int = 96, seed: int = 0) -> Path:
    """Write a grayscale PNG: one row per GRID_ROWS entry, `per_row` seeded random examples each
    (fewer if the manifest has fewer), with the row title and each image's label tag (val/test
    rows say their split). Returns out_path."""
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
        texts.append((4, r * h + thumb // 2 - 6 * (title.count("\n") + 1), title))
        for c, i in enumerate(idx):
            img = resize_crop(read_image(paths[i]), thumb)
            if img.ndim == 3:
                img = img.mean(axis=2)
            x = margin + c * thumb
            canvas[r * h: r * h + thumb, x: x + thumb] = np.round(img * 255).astype(np.uint8)
            texts.append((x + 2, r * h + thumb, _tag(df["label"][i], df["split"][i])))
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for x, y, t in texts:
        draw.multiline_text((x, y), t, fill=255, font=font, spacing=1)
    save_png(np.asarray(im), out_path)
    return Path(out_path)


def counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows per (split, subset, label, source kind); source kind drops anything after a colon."""
    df = validate_manifest(manifest)
    kind = df["source"].str.split(":").str[0]
    return (df.assign(source=kind).groupby(["split", "subset", "label", "source"]).size()
            .rename("n").reset_index())


def pixel_features(paths: list, *, size: int = 64) -> np.ndarray:
    """(n, size*size) grayscale pixels (resized to size x size), each row centred and unit-norm, so
    a dot product of two rows is their Pearson correlation."""
    x = []
    for p in paths:
        img = resize_crop(read_image(p), size)
        x.append((img.mean(axis=2) if img.ndim == 3 else img).ravel())
    x = np.stack(x).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def similarity(features_a: np.ndarray, features_b: np.ndarray | None = None) -> dict:
    """Statistics of the dot products of unit-norm features (Pearson correlation for
    `pixel_features`, cosine for normalised embeddings).

    Without `features_b`: all pairs of distinct rows of `features_a`, and each row's nearest *other*
    row. With it: every (a, b) pair, and each row of a's nearest row of b (a and b must not share
    images, or the nearest neighbour is the image itself).
    Returns n_a, n_b, pair mean / p5 / p50 / p95, and the nearest-neighbour similarity per row of a:
    nn_mean / nn_p5 / nn_p50 / nn_p95 / nn_max."""
    a = np.asarray(features_a, dtype=np.float64)
    if len(a) < (2 if features_b is None else 1):
        raise ValueError(f"similarity: need at least {2 if features_b is None else 1} rows in features_a, got {len(a)}")
    if features_b is None:
        c = a @ a.T
        vals = c[np.triu_indices(len(a), 1)]
        np.fill_diagonal(c, -np.inf)
        n_b = len(a)
    else:
        b = np.asarray(features_b, dtype=np.float64)
        if len(b) < 1:
            raise ValueError("similarity: features_b is empty")
        c = a @ b.T
        vals = c.ravel()
        n_b = len(b)
    nn = c.max(axis=1)
    p5, p50, p95 = np.percentile(vals, [5, 50, 95])
    q5, q50, q95 = np.percentile(nn, [5, 50, 95])
    return {"n_a": int(len(a)), "n_b": int(n_b), "mean": float(vals.mean()), "p5": float(p5), "p50": float(p50),
            "p95": float(p95), "nn_mean": float(nn.mean()), "nn_p5": float(q5), "nn_p50": float(q50),
            "nn_p95": float(q95), "nn_max": float(nn.max())}


def pixel_correlation(images: list, others: list | None = None, *, size: int = 64) -> dict:
    """Pearson correlation of grayscale pixels (size x size) among `images` (all pairs) or between
    `images` and `others`; see `similarity` for the statistics returned."""
    return similarity(pixel_features(images, size=size), None if others is None else pixel_features(others, size=size))
