"""Build the default demo dataset, time it, and measure how alike its images are.

    .venv/bin/python benchmarks/bench_data.py [--out DIR] [--grid docs/images/data_examples.png]

Prints a table and writes benchmarks/results/data.json. Similarities: Pearson correlation of
64x64 grayscale pixels, and cosine similarity of ImageNet MobileNetV2 embeddings (1280-d, the
project's default memorization embedder), for DRR-DRR, real-real and real-DRR pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memcontrol.data import card  # noqa: E402
from memcontrol.data.demo import build_demo  # noqa: E402
from memcontrol.data.images import load_images  # noqa: E402
from memcontrol.data.manifest import image_paths, save_manifest  # noqa: E402


def embedding_similarity(a: list[Path], b: list[Path] | None) -> dict:
    from memcontrol.embed import build_embedder

    emb = build_embedder("mobilenet_v2")

    def feats(paths):
        x = (load_images(paths, 128) + 1.0) / 2.0
        f = emb.embed(x)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    fa = feats(a)
    if b is None:
        c = fa @ fa.T
        np.fill_diagonal(c, -np.inf)
        vals = c[np.triu_indices(len(fa), 1)]
    else:
        c = fa @ feats(b).T
        vals = c.ravel()
    return {"mean": float(vals.mean()), "p95": float(np.percentile(vals, 95)), "nn_mean": float(c.max(axis=1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="dataset folder (default: a temporary one)")
    ap.add_argument("--grid", type=Path, default=None, help="also write the data-card example grid here")
    ap.add_argument("--n-sim", type=int, default=300, help="DRRs sampled for the similarity statistics")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="memcontrol-demo-"))

    t0, c0 = time.perf_counter(), time.process_time()
    df = build_demo(out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_manifest(df, out / "manifest.parquet")

    paths = image_paths(df, out)
    is_drr = df["source"].str.startswith("drr").to_numpy()
    rng = np.random.default_rng(0)
    drr_idx = rng.choice(np.flatnonzero(is_drr), size=min(args.n_sim, int(is_drr.sum())), replace=False)
    drr = [paths[i] for i in drr_idx]
    real = [paths[i] for i in np.flatnonzero(~is_drr)]
    train_drr = [paths[i] for i in np.flatnonzero(is_drr & (df["split"] == "train").to_numpy())]

    sims = {
        "pixel_corr": {
            "drr_drr": card.pixel_correlation(drr),
            "real_real": card.pixel_correlation(real),
            "real_vs_train_drr": card.pixel_correlation(real, train_drr),
        }
    }
    try:
        sims["mobilenet_cos"] = {
            "drr_drr": embedding_similarity(drr, None),
            "real_real": embedding_similarity(real, None),
            "real_vs_train_drr": embedding_similarity(real, train_drr),
        }
    except Exception as e:  # the embedder is another module; report, do not fail the timing
        sims["mobilenet_cos"] = {"error": f"{type(e).__name__}: {e}"}

    counts = card.counts(df)
    src = df["source"].str.split(":").str[0].value_counts().to_dict()
    result = {
        "build_demo_defaults": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "n_images": len(df),
                                "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
                                "python": platform.python_version()},
        "by_split_subset": df.groupby(["split", "subset"]).size().rename("n").reset_index()
        .to_dict(orient="records"),
        "by_label": df["label"].value_counts().to_dict(),
        "by_source": src,
        "prompt_words": {"mean": float(df["prompt"].str.split().str.len().mean()),
                         "max": int(df["prompt"].str.split().str.len().max())},
        "similarity": sims,
    }
    print(f"build_demo (defaults): {len(df)} images, wall {wall:.1f} s, CPU {cpu:.1f} s "
          f"(load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(counts.to_string(index=False))
    print("\nsimilarity               mean    p95   nn_mean")
    for kind, d in sims.items():
        for pair, s in d.items():
            if isinstance(s, dict):
                print(f"{kind:13s} {pair:18s} {s['mean']:.3f}  {s['p95']:.3f}  {s['nn_mean']:.3f}")
            else:
                print(f"{kind:13s} {s}")
    res = Path(__file__).parent / "results" / "data.json"
    res.parent.mkdir(exist_ok=True)
    res.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {res}")
    if args.grid:
        card.example_grid(df, out, args.grid)
        print(f"wrote {args.grid} ({args.grid.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
