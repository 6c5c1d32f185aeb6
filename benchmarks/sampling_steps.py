"""Do fewer DDIM steps change the evaluation? Re-scores finished fine-tunes at several `sample.steps`.

Each adapter folder (a `run_arm` output: adapter.safetensors + mask.json) is loaded onto the
workdir's base model and scored by the pipeline's own `memcontrol.evaluate.evaluate` (same prompts, seeds,
embedder, FAISS index and threshold) once per step count. Prints a table, writes JSON.

Usage: python benchmarks/sampling_steps.py WORKDIR ADAPTER_DIR [ADAPTER_DIR ...] [--steps 15 10]
       [--out benchmarks/results/sampling_steps.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from memcontrol import tuning
from memcontrol.base_model import load_base
from memcontrol.config import load_params
from memcontrol.evaluate import EvalContext, evaluate
from memcontrol.report import markdown_table
from memcontrol.workdir import Layout

KEYS = ["mem.flagged_rate", "mem.own_match_rate", "mem.mean_sim", "quality.kid_mean", "quality.fid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("adapters", type=Path, nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[15, 10])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling_steps.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    layout = Layout(args.workdir)
    ctx = EvalContext(params, layout)
    rows = []
    for d in args.adapters:
        bundle = load_base(layout)
        mask = tuning.load_adapter(d, bundle.unet)
        for steps in args.steps:
            ctx.params = params.model_copy(update={"sample": params.sample.model_copy(update={"steps": steps})})
            t0 = time.perf_counter()
            m, *_ = evaluate(bundle, ctx)
            rows.append({"adapter": d.name, "method": mask.method, "steps": steps,
                         "eval_s": round(time.perf_counter() - t0, 1), **{k: round(float(m[k]), 4) for k in KEYS}})
    print(markdown_table(pd.DataFrame(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base_train": params.model.base_train.model_dump(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
