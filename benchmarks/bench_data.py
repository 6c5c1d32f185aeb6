"""Build the default demo dataset (params.yaml `data.demo`), time it, count it and measure how alike
its images are.

    .venv/bin/python benchmarks/bench_data.py [--params params.yaml] [--out DIR] [--grid docs/images/data_examples.png]

Prints tables and writes benchmarks/results/data.json (docs/data.md cites it). Similarities, each
as the Pearson correlation of 64x64 grayscale pixels and as the cosine of the configured
memorization embedder (params.yaml `metrics`: ImageNet MobileNetV2, 1280-d, uncentred):

* ct_ct: pairs of base CT slices; drr_drr: pairs of fine-tuning radiographs (train/val/test);
* mem_vs_train_nn: each memorization-subset image against the other train radiographs (its
  nearest neighbour is what a copy of it has to stand out from);
* heldout_vs_train_nn: each val/test radiograph against all train radiographs (what the
  memorization threshold is calibrated on, val, and its false-positive floor measured on, test);
* codec_vs_train_nn: each VAE-only radiograph against the train radiographs;
* ct_vs_drr: base CT slices against fine-tuning radiographs (how far apart the two worlds are).
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

from memcontrol.config import load_params  # noqa: E402
from memcontrol import assets  # noqa: E402
from memcontrol.data import card, drr, reports, transfer  # noqa: E402
from memcontrol.data.demo import DRR_MIX  # noqa: E402
from memcontrol.data.demo import build_demo  # noqa: E402
from memcontrol import atomic  # noqa: E402
from memcontrol.data.images import load_images  # noqa: E402
from memcontrol.data.manifest import image_paths, save_manifest  # noqa: E402

PAIRS = ("ct_ct", "drr_drr", "mem_vs_train_nn", "heldout_vs_train_nn", "codec_vs_train_nn", "ct_vs_drr")


def embeddings(paths: list[Path], params) -> tuple[np.ndarray, str]:
    """Unit-norm embeddings of the configured memorization embedder, and its description."""
    from memcontrol.embed import build_embedder

    m = params.metrics
    emb = build_embedder(m.embedder, path=m.embedder_path, image_size=m.embed_size, **m.embedder_options)
    feats = []
    for start in range(0, len(paths), 128):  # bounded memory: 128 images at a time
        x = (load_images(paths[start:start + 128], m.embed_size) + 1.0) / 2.0
        feats.append(emb.embed(x))
    f = np.concatenate(feats)
    return f / np.linalg.norm(f, axis=1, keepdims=True), f"{m.embedder} {dict(m.embedder_options)} at {m.embed_size} px"


def _timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3)}


def components(image_size: int, n: int = 60) -> dict:
    """Where build_demo's time goes, measured apart with the caches cleared: reading the CT, the IU
    reports and the DRR phantom once per process, and rendering `n` CT slices and `n` DRRs (with
    their prompts; PNG encoding not included). Also the inputs' sizes and the sentence pools."""
    import nibabel as nib

    drr._load_phantom.cache_clear()
    reports.load_iu_reports.cache_clear()
    reports.sentence_bank.cache_clear()
    ct, t_ct = _timed(transfer.load_ct)
    rng = np.random.default_rng(0)
    _, t_slices = _timed(lambda: [transfer.render_slice(ct, rng, image_size) for _ in range(n)])
    iu, t_iu = _timed(reports.load_iu_reports)
    bank, t_bank = _timed(reports.sentence_bank, iu)
    phantom, t_ph = _timed(drr.load_phantom, 4 if image_size <= 160 else 2)
    weights = np.array([w for _, _, w in DRR_MIX])

    def drrs():
        for _ in range(n):
            kind, where, _ = DRR_MIX[int(rng.choice(len(DRR_MIX), p=weights / weights.sum()))]
            _, finding, _ = reports.drr_prompt(kind, where, bank, rng)
            drr.render(phantom, finding, rng, image_size)

    _, t_drr = _timed(drrs)
    per = lambda t: {k: round(v / n * 1000, 1) for k, v in t.items()}  # noqa: E731 -> ms per image
    header = nib.load(assets.ct_volume()).header
    return {
        "load_ct": t_ct, "ct_slice_ms": per(t_slices), "load_iu_reports": t_iu, "sentence_bank": t_bank,
        "load_phantom": t_ph, "drr_ms": per(t_drr), "n_timed": n,
        "ct": {"shape": [int(v) for v in header.get_data_shape()],
               "spacing_mm": [round(float(v), 3) for v in header.get_zooms()],
               "n_structures": len(ct.names), "chest_slices": list(ct.z_range),
               "phantom_shape": list(phantom.mu_soft.shape),
               "phantom_spacing_mm": [round(float(v), 2) for v in phantom.spacing]},
        "iu": {"n_reports": len(iu), "n_normal_reports": len(bank.normal),
               "positive_sentences": {f"{k}_{w}" if w else k: len(v) for (k, w), v in bank.positive.items()},
               "context_sentences": {k: len(v) for k, v in bank.context.items()}},
    }


def pair_stats(features: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
    g = groups
    return {
        "ct_ct": card.similarity(features[g["ct"]]),
        "drr_drr": card.similarity(features[g["drr"]]),
        "mem_vs_train_nn": card.similarity(features[g["mem"]], features[g["train_original"]]),
        "heldout_vs_train_nn": card.similarity(features[g["heldout"]], features[g["train"]]),
        "codec_vs_train_nn": card.similarity(features[g["codec"]], features[g["train"]]),
        "ct_vs_drr": card.similarity(features[g["ct"]], features[g["drr"]]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=None, help="dataset folder (default: a temporary one)")
    ap.add_argument("--grid", type=Path, default=None, help="also write the data-card example grid here")
    args = ap.parse_args()
    params = load_params(args.params)
    demo = params.data.demo.model_dump()
    out = args.out or Path(tempfile.mkdtemp(prefix="memcontrol-demo-"))

    t0, c0 = time.perf_counter(), time.process_time()
    df = build_demo(out, seed=params.seed, **demo)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    load = os.getloadavg()[0]
    save_manifest(df, out / "manifest.parquet")

    paths = image_paths(df, out)
    split, subset = df["split"].to_numpy(), df["subset"].to_numpy()
    groups = {
        "ct": np.flatnonzero((split == "base") & (subset == "")),
        "codec": np.flatnonzero(subset == "codec"),
        "drr": np.flatnonzero(np.isin(split, ["train", "val", "test"])),
        "train": np.flatnonzero(split == "train"),
        "train_original": np.flatnonzero(subset == "original"),
        "mem": np.flatnonzero(subset == "mem"),
        "heldout": np.flatnonzero(np.isin(split, ["val", "test"])),
    }
    t1 = time.perf_counter()
    sims = {"pixel_corr": pair_stats(card.pixel_features(paths), groups)}
    emb, emb_name = embeddings(paths, params)
    sims["embedding_cos"] = pair_stats(emb, groups)
    sims["embedder"] = emb_name
    sim_s = time.perf_counter() - t1
    parts = components(demo["image_size"])

    table = card.counts(df)
    words = df["prompt"].str.split().str.len()
    is_ct = df["source"] == "ct-axial"
    result = {
        "params": {"seed": params.seed, **demo},
        "build_demo": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "n_images": len(df),
                       "cpus": os.cpu_count(), "load_avg_1min": round(load, 2),
                       "python": platform.python_version(), "similarity_wall_s": round(sim_s, 1)},
        "components": parts,
        "by_split_subset": df.groupby(["split", "subset"]).size().rename("n").reset_index()
        .to_dict(orient="records"),
        "by_split_subset_label": table.to_dict(orient="records"),
        "by_label": df["label"].value_counts().sort_index().to_dict(),
        "by_source": df["source"].value_counts().to_dict(),
        "mem_labels": df.loc[df["subset"] == "mem", "label"].value_counts().sort_index().to_dict(),
        "prompts": {
            "distinct": int(df["prompt"].nunique()),
            "distinct_radiograph": int(df.loc[~is_ct, "prompt"].nunique()),
            "distinct_ct": int(df.loc[is_ct, "prompt"].nunique()),
            "words_radiograph": {"mean": float(words[~is_ct].mean()), "min": int(words[~is_ct].min()),
                                 "max": int(words[~is_ct].max())},
            "words_ct": {"mean": float(words[is_ct].mean()), "min": int(words[is_ct].min()),
                         "max": int(words[is_ct].max())},
        },
        "similarity": sims,
    }
    print(f"build_demo ({', '.join(f'{k}={v}' for k, v in result['params'].items())}): {len(df)} images, "
          f"wall {wall:.1f} s, CPU {cpu:.1f} s (load avg {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"components: CT {parts['load_ct']['cpu_s']:.1f} s, IU reports {parts['load_iu_reports']['cpu_s']:.1f} s + "
          f"bank {parts['sentence_bank']['cpu_s']:.1f} s, phantom {parts['load_phantom']['cpu_s']:.1f} s CPU; "
          f"per image {parts['ct_slice_ms']['cpu_s']:.0f} ms (CT slice), {parts['drr_ms']['cpu_s']:.0f} ms (DRR) CPU")
    print(df.groupby(["split", "subset"]).size().rename("n").reset_index().to_string(index=False))
    print()
    print(table.pivot_table(index="label", columns=["split", "subset"], values="n", aggfunc="sum", fill_value=0)
          .to_string())
    print(f"\nsimilarity (pixel: Pearson 64 px; embedding: {emb_name}, cosine)")
    print(f"{'':14s}{'pair':22s}{'n_a':>5s}{'n_b':>5s}{'mean':>7s}{'p95':>7s}{'nn_mean':>8s}{'nn_p95':>7s}{'nn_max':>7s}")
    for kind in ("pixel_corr", "embedding_cos"):
        for pair in PAIRS:
            s = sims[kind][pair]
            print(f"{kind:14s}{pair:22s}{s['n_a']:5d}{s['n_b']:5d}{s['mean']:7.3f}{s['p95']:7.3f}"
                  f"{s['nn_mean']:8.3f}{s['nn_p95']:7.3f}{s['nn_max']:7.3f}")
    res = Path(__file__).parent / "results" / "data.json"
    atomic.write_text(res, json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {res}")
    if args.grid:
        card.example_grid(df, out, args.grid)
        print(f"wrote {args.grid} ({args.grid.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
