"""Does full fine-tuning memorize the duplicated subset? Probes on a finished demo workdir.

Each probe fully fine-tunes the workdir's base model on a memorization-inducing set
(`data_size_ratio` of train/original + the memorization subset x `n_repeats`) for `steps` steps
and scores it with the pipeline's own `memcontrol.evaluate.evaluate` (same prompts, seeds, embedder, FAISS index
and calibrated threshold as every trial). Finished probes are reused (the arm's record, memcontrol/reuse.py).

Usage: python benchmarks/memorization_probe.py WORKDIR [--probe lr,repeats,steps,ratio,batch ...]
       [--out benchmarks/results/memorization_probe.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd

from memcontrol.arms import full_mask, run_arm
from memcontrol.config import load_params
from memcontrol.data.manifest import memorization_training_set
from memcontrol.evaluate import EvalContext
from memcontrol.report import markdown_table
from memcontrol.workdir import Layout

# (lr, n_repeats, steps, data_size_ratio, batch): the default Stage 2, then longer / more mem-heavy
PROBES = ["1e-3,40,300,1.0,8", "1e-3,40,300,0.25,8", "1e-3,40,150,0.25,32", "1e-3,40,200,0.25,32",
          "1e-3,40,300,0.25,32", "2e-3,40,150,0.25,32"]
KEYS = ["mem.flagged_rate", "mem.own_match_rate", "mem.mean_sim", "mem.p95_sim", "quality.kid_mean", "quality.fid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--probe", nargs="+", default=PROBES)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memorization_probe.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    layout = Layout(args.workdir)
    ctx = EvalContext(params, layout)
    rows_out = []
    for spec in args.probe:
        lr, reps, steps, ratio, bs = (float(v) for v in spec.split(","))
        mask = dataclasses.replace(full_mask(params), lr=lr)
        rows = memorization_training_set(ctx.df, data_size_ratio=ratio, n_repeats=int(reps), seed=params.seed)
        rec = run_arm(params, layout, ctx, mask, args.workdir / "probes" / spec.replace(",", "_"),
                      rows=rows, steps=int(steps), seed=0, batch_size=int(bs))
        m = rec["metrics"]
        rows_out.append({"lr": lr, "n_repeats": int(reps), "steps": int(steps), "data_size_ratio": ratio,
                         "batch": int(bs), "rows": len(rows), "train_s": round(m["train_seconds"], 1),
                         "wall_s": round(m["wall_seconds"], 1), **{k: round(float(m[k]), 4) for k in KEYS}})
    floor = json.loads((layout.reference / "threshold.json").read_text())
    print(markdown_table(pd.DataFrame(rows_out)))
    print(f"threshold {floor['threshold']:.4f}; held-out false-positive floor {floor['heldout_flagged_rate']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base_train": params.model.base_train.model_dump(), "sample_steps": params.sample.steps,
                                    "threshold": floor["threshold"],
                                    "heldout_flagged_rate": floor["heldout_flagged_rate"], "probes": rows_out}, indent=2))


if __name__ == "__main__":
    main()
