"""Stage `reference`, once per dataset: the latents and text states of every image and prompt, the
FAISS index of the training images' embeddings and the memorization threshold calibrated on
held-out images (val), with its false-positive floor on test (docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol import atomic
from memcontrol.base_model import load_base
from memcontrol.config import Params
from memcontrol.data.images import load_images
from memcontrol.embed import Embedder, build_embedder
from memcontrol.encode import encode_manifest, image_paths
from memcontrol.memorization import calibrate_threshold
from memcontrol.reference_index import ReferenceIndex
from memcontrol.train import resolve_device
from memcontrol.workdir import Layout, read_manifest, rows_of, write_json


def make_embedder(params: Params) -> Embedder:
    """The copy detector's embedder (index, threshold, memorization objective)."""
    m = params.metrics
    return build_embedder(m.embedder, path=m.embedder_path, image_size=m.embed_size, **m.embedder_options)


def make_quality_embedder(params: Params) -> Embedder:
    """The embedder whose features FID/KID compare."""
    m = params.metrics
    return build_embedder(m.quality_embedder, path=m.quality_embedder_path, image_size=m.embed_size,
                          **m.quality_embedder_options)


def floor_spread(heldout_max_sims: np.ndarray, quantile: float, *, n_splits: int = 200, seed: int = 0) -> dict:
    """The false-positive floor as an estimate with its spread: `n_splits` random halvings of the
    held-out images, calibrating on one half (split-conformal, `calibrate_threshold`) and counting
    the other half's images above that threshold. One split alone is a noisy estimate."""
    sims = np.asarray(heldout_max_sims, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(n_splits):
        order = rng.permutation(len(sims))
        cal, check = sims[order[: len(sims) // 2]], sims[order[len(sims) // 2:]]
        rates.append(float((check > calibrate_threshold(cal, quantile, warn=False)).mean()))
    rates = np.array(rates)
    return {"n_splits": n_splits, "n_images": int(len(sims)), "mean": float(rates.mean()),
            "std": float(rates.std(ddof=1)), "p10": float(np.quantile(rates, 0.1)),
            "p50": float(np.quantile(rates, 0.5)), "p90": float(np.quantile(rates, 0.9))}


def reference(params: Params, layout: Layout) -> Path:
    """Write data/reference/: encoded.safetensors, index/, {train,val,test}_feats.npy (copy
    detector), {val,test}_quality_feats.npy (FID/KID's real side), ids.json (index row -> manifest
    id) and threshold.json.

    The threshold is calibrated on the val images' nearest-training similarities (held-out images
    of the kind a model might copy); the false-positive floor is the share of test images above
    it, and `floor_spread` over repeated random halvings of val + test gives its spread."""
    df = read_manifest(layout)
    bundle = load_base(layout, resolve_device(params.train.device))
    root = layout.manifest.parent
    out = layout.reference
    out.mkdir(parents=True, exist_ok=True)
    encode_manifest(bundle, df[df["split"] != "base"].reset_index(drop=True), root).save(out / "encoded.safetensors")

    embedder, quality_embedder = make_embedder(params), make_quality_embedder(params)
    splits = {name: rows_of(df, name) for name in ("train", "val", "test")}

    def feats(rows: pd.DataFrame, embedders: tuple[Embedder, ...]) -> list[np.ndarray]:
        """Each embedder's (n, d) features of `rows`, the images loaded (and decoded) once.
        decoded: through the frozen VAE, for both the copy detector and FID/KID (whose values are
        then those of the single-embedder design: the VAE's blur is not counted as lost quality)."""
        chunks: list[list[np.ndarray]] = [[] for _ in embedders]
        for i in range(0, len(rows), 256):
            x = load_images(image_paths(rows.iloc[i : i + 256], root), bundle.resolution)
            if params.metrics.reference_space == "decoded":
                x01 = bundle.decode(bundle.encode_images(x)[0])
            else:
                x01 = (x + 1) / 2
            for chunk, use in zip(chunks, embedders):
                chunk.append(use.embed(x01))
        return [np.concatenate(c) for c in chunks]

    features = {"train": feats(splits["train"], (embedder,))[0]}
    for name in ("val", "test"):
        features[name], quality = feats(splits[name], (embedder, quality_embedder))
        with atomic.atomic_path(out / f"{name}_quality_feats.npy") as tmp:
            np.save(tmp, quality)
    index = ReferenceIndex.build(features["train"], kind=params.metrics.index, center=params.metrics.center)
    index.save(out / "index")
    for name, f in features.items():
        with atomic.atomic_path(out / f"{name}_feats.npy") as tmp:
            np.save(tmp, f)
    write_json({name: rows["id"].tolist() for name, rows in splits.items()}, out / "ids.json")

    val_sims = index.search(features["val"], k=1)[0][:, 0]
    test_sims = index.search(features["test"], k=1)[0][:, 0]
    th = params.metrics.threshold
    thr = float(th.value) if th.mode == "fixed" else calibrate_threshold(val_sims, th.quantile)
    info = {
        "threshold": thr,
        "mode": th.mode,
        "quantile": th.quantile,
        "embedder": embedder.name,
        "center": params.metrics.center,
        "calibrated_on": "val",
        "n_val": int(len(val_sims)),
        "n_heldout": int(len(test_sims)),
        "heldout_flagged_rate": float((test_sims > thr).mean()),
        "heldout_floor_spread": floor_spread(np.concatenate([val_sims, test_sims]), th.quantile, seed=params.seed),
        "heldout_mean_sim": float(test_sims.mean()),
        "heldout_p95_sim": float(np.quantile(test_sims, 0.95)),
        "val_mean_sim": float(val_sims.mean()),
    }
    write_json(info, out / "threshold.json")
    return out
