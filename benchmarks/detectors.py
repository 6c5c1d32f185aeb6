"""Which copy detector sees memorization: the audit's fine-tuned models scored by several embedders,
each with its threshold calibrated the same way (val, `metrics.threshold.quantile`).

For every embedder: the FAISS index over the training images (through the VAE, as `reference`
builds it), the threshold calibrated on val, the false-positive floor on test and over 200 random
val/test halvings (`reference.floor_spread`), and the flagged rate of every audited model's
memorization-prompt generations (the very generations `evaluate` scores: same prompts, seeds,
sampler). A detector is better when it flags more of a memorizing model's generations at the same
floor. The row of the workdir's own `metrics.embedder` reproduces the audit's flagged rates.

Usage (after `memcontrol demo` and `memcontrol audit` in WORKDIR):
    python benchmarks/detectors.py WORKDIR [--out benchmarks/results/detectors.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memcontrol.config import load_params
from memcontrol.data.images import load_images
from memcontrol.embed import build_embedder
from memcontrol.encode import image_paths
from memcontrol.evaluate import EvalContext
from memcontrol.memorization import calibrate_threshold
from memcontrol.models.bundle import load_bundle
from memcontrol.reference import floor_spread
from memcontrol.reference_index import ReferenceIndex
from memcontrol.sample import generate, item_seed
from memcontrol.tuning import load_adapter
from memcontrol.workdir import Layout, rows_of

DETECTORS = [  # (kind, options): the ImageNet CNN with and without blur, grey levels at three grids
    ("mobilenet_v2", {"blur_sigma": 1.5}),
    ("mobilenet_v2", {}),
    ("pixel", {"grid": 8}),
    ("pixel", {"grid": 16}),
    ("pixel", {"grid": 32}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detectors.json"))
    args = ap.parse_args()
    work = args.workdir
    params = load_params(work / "params.yaml")
    layout = Layout(work)
    ctx = EvalContext(params, layout, "test")
    arm_dirs = sorted(d for d in (layout.root / "audit" / "arms").glob("*/seed*") if (d / "adapter.safetensors").exists())
    if not arm_dirs:
        sys.exit(f"{work}/audit/arms: no audited model (run `memcontrol audit` first)")
    enc, sample = ctx.encoded, params.sample
    mem = ctx.mem_rows
    text = enc.text[enc.prompt_index(mem["prompt"].tolist())].repeat_interleave(sample.mem_seeds, 0)
    seeds = [item_seed(sample.seed, i, k) for i in range(len(mem)) for k in range(sample.mem_seeds)]

    t0 = time.perf_counter()
    base = load_bundle(layout.base)
    generations = {"base": generate(base, text, seeds, steps=sample.steps, guidance=sample.guidance,
                                    batch_size=sample.batch_size, null_text=enc.null_text)}
    for d in arm_dirs:
        bundle = load_bundle(layout.base)
        load_adapter(d, bundle.unet)
        generations[f"{d.parent.name}/{d.name}"] = generate(bundle, text, seeds, steps=sample.steps,
                                                            guidance=sample.guidance, batch_size=sample.batch_size,
                                                            null_text=enc.null_text)
    root = layout.manifest.parent

    def real(split: str) -> torch.Tensor:  # through the VAE, as the reference stage embeds them
        rows = rows_of(ctx.df, split)
        with torch.inference_mode():
            return base.decode(base.encode_images(load_images(image_paths(rows, root), base.resolution))[0])

    reals = {split: real(split) for split in ("train", "val", "test")}
    quantile = params.metrics.threshold.quantile
    results = []
    for kind, options in DETECTORS:
        embedder = build_embedder(kind, image_size=params.metrics.embed_size, **options)
        feats = {split: embedder.embed(x) for split, x in reals.items()}
        index = ReferenceIndex.build(feats["train"], kind="flat", center=params.metrics.center)
        val_sims = index.search(feats["val"], k=1)[0][:, 0]
        test_sims = index.search(feats["test"], k=1)[0][:, 0]
        threshold = calibrate_threshold(val_sims, quantile)
        row = {"embedder": kind, "options": options, "threshold": threshold,
               "floor_test": float((test_sims > threshold).mean()),
               "floor_spread": floor_spread(np.concatenate([val_sims, test_sims]), quantile, seed=params.seed),
               "flagged": {}, "mean_sim": {}}
        for name, imgs in generations.items():
            sims = index.search(embedder.embed(imgs), k=1)[0][:, 0]
            row["flagged"][name] = float((sims > threshold).mean())
            row["mean_sim"][name] = float(sims.mean())
        results.append(row)

    arms = sorted({name.split("/")[0] for name in generations if name != "base"})
    summary = []
    for row in results:
        out = {"embedder": row["embedder"], "options": row["options"], "floor_test": row["floor_test"],
               "floor_mean": row["floor_spread"]["mean"], "floor_p90": row["floor_spread"]["p90"],
               "base": row["flagged"]["base"]}
        for arm in arms:
            rates = [v for k, v in row["flagged"].items() if k.split("/")[0] == arm]
            out[arm] = {"mean": float(np.mean(rates)), "std": float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0,
                        "n_seeds": len(rates)}
        summary.append(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "workdir": "<workdir>", "quantile": quantile, "n_generations": len(seeds),
        "mem_seeds": sample.mem_seeds, "arms": arms, "summary": summary, "detectors": results,
        "seconds": time.perf_counter() - t0}, indent=2))
    head = ["embedder", "floor test", "floor mean (p90)", "base", *arms]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for s in summary:
        name = s["embedder"] + (" " + ",".join(f"{k}={v}" for k, v in s["options"].items()) if s["options"] else "")
        cells = [name, f"{s['floor_test']:.3f}", f"{s['floor_mean']:.3f} ({s['floor_p90']:.3f})", f"{s['base']:.3f}",
                 *(f"{s[a]['mean']:.3f} ± {s[a]['std']:.3f}" for a in arms)]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
