"""Stage `reference`, once per dataset: the latents and text states of every image and prompt, the
FAISS index of the training images' embeddings and the memorization threshold calibrated on
held-out real images (docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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
    m = params.metrics
    return build_embedder(m.embedder, path=m.embedder_path, image_size=m.embed_size, **m.embedder_options)


def reference(params: Params, layout: Layout) -> Path:
    """Write data/reference/: encoded.safetensors, index/, train_feats.npy, test_feats.npy,
    ids.json (index row -> manifest id) and threshold.json (threshold + held-out floor)."""
    df = read_manifest(layout)
    bundle = load_base(layout, resolve_device(params.train.device))
    root = layout.manifest.parent
    out = layout.reference
    out.mkdir(parents=True, exist_ok=True)
    encode_manifest(bundle, df[df["split"] != "base"].reset_index(drop=True), root).save(out / "encoded.safetensors")

    embedder = make_embedder(params)
    train, test = rows_of(df, "train"), rows_of(df, "test")

    def feats(rows: pd.DataFrame) -> np.ndarray:
        chunks = []
        for i in range(0, len(rows), 256):
            x = load_images(image_paths(rows.iloc[i : i + 256], root), bundle.resolution)
            if params.metrics.reference_space == "decoded":
                x01 = bundle.decode(bundle.encode_images(x)[0])
            else:
                x01 = (x + 1) / 2
            chunks.append(embedder.embed(x01))
        return np.concatenate(chunks)

    train_f, test_f = feats(train), feats(test)
    index = ReferenceIndex.build(train_f, kind=params.metrics.index, center=params.metrics.center)
    index.save(out / "index")
    np.save(out / "train_feats.npy", train_f)
    np.save(out / "test_feats.npy", test_f)
    write_json({"train": train["id"].tolist(), "test": test["id"].tolist()}, out / "ids.json")

    sims = index.search(test_f, k=1)[0][:, 0]
    # Calibrate on half of the held-out images, measure the false-positive floor on the other half.
    cal, chk = sims[0::2], sims[1::2]
    th = params.metrics.threshold
    thr = float(th.value) if th.mode == "fixed" else calibrate_threshold(cal, th.quantile)
    real = ~test["source"].str.startswith("drr").to_numpy()  # acquired images, not DRR renders
    info = {
        "threshold": thr,
        "mode": th.mode,
        "quantile": th.quantile,
        "embedder": embedder.name,
        "center": params.metrics.center,
        "n_heldout": int(len(sims)),
        "heldout_flagged_rate": float((chk > thr).mean()) if len(chk) else float("nan"),
        "heldout_flagged_rate_all": float((sims > thr).mean()),
        "heldout_mean_sim": float(sims.mean()),
        "heldout_p95_sim": float(np.quantile(sims, 0.95)),
        "heldout_real_n": int(real.sum()),
        "heldout_real_flagged_rate": float((sims[real] > thr).mean()) if real.any() else float("nan"),
        "heldout_real_mean_sim": float(sims[real].mean()) if real.any() else float("nan"),
    }
    write_json(info, out / "threshold.json")
    return out
