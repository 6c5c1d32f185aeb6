"""Is full fine-tuning a fair opponent? Its flagged rate and quality against its learning rate, at
the Stage-2 budget (final.*: the memorization-inducing set, steps, batch), scored on test exactly as
Stage 2 scores it. The reference searched full fine-tuning only in [5e-6, 1e-5] (docs/paper.md);
the fair choice is the LR that gives full fine-tuning its best quality, since a weaker opponent
flatters every mask.

Usage: python benchmarks/full_ft_lr.py WORKDIR [--lrs 1e-4 3e-4 1e-3 3e-3] [--seeds 0 1 2]
       [--out benchmarks/results/full_ft_lr.json]
Finished arms are reused (memcontrol/reuse.py), so a killed run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from memcontrol.arms import final_rows, full_mask, run_arm
from memcontrol.config import load_params
from memcontrol.evaluate import EvalContext
from memcontrol.report import markdown_table
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout

KEYS = ["mem.flagged_rate", "mem.own_match_rate", "mem.mean_sim", "quality.kid_mean", "quality.fid"]


def sweep(workdir: Path, make_mask: Callable[[float], Mask], lrs: list[float], seeds: list[int],
          tag: str) -> tuple[list[dict], pd.DataFrame, float]:
    """Each LR x seed at the Stage-2 budget, scored on test: (runs, summary per LR with mean and std,
    the LR of the best mean KID). Arms go to WORKDIR/benchmarks/<tag>/ and are reused when finished."""
    params = load_params(workdir / "params.yaml")
    layout = Layout(workdir)
    ctx = EvalContext(params, layout, "test")
    rows = final_rows(params, ctx)
    t0 = time.perf_counter()
    runs = []
    for lr in lrs:
        for seed in seeds:
            m = run_arm(params, layout, ctx, make_mask(lr), workdir / "benchmarks" / tag / f"lr{lr:g}-seed{seed}",
                        rows=rows, steps=params.final.steps, seed=seed, batch_size=params.final.batch_size)["metrics"]
            runs.append({"lr": lr, "seed": seed, **{k: float(m[k]) for k in KEYS}, "train_s": round(m["train_seconds"], 1)})
            print(f"{tag}: lr {lr:g} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = pd.DataFrame(runs).groupby("lr")[KEYS].agg(["mean", "std"])
    summary.columns = [f"{k}.{stat}" for k, stat in summary.columns]
    summary = summary.reset_index()
    return runs, summary, float(summary.loc[summary["quality.kid_mean.mean"].idxmin(), "lr"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/full_ft_lr.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    t0 = time.perf_counter()
    runs, summary, best = sweep(args.workdir, lambda lr: dataclasses.replace(full_mask(params), lr=lr), args.lrs,
                                args.seeds, "full_ft_lr")
    print(markdown_table(summary))
    print(f"best-quality LR: {best:g} (params final.full_lr = {params.final.full_lr:g})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "final": params.final.model_dump(mode="json"), "seeds": args.seeds, "best_quality_lr": best,
        "full_lr": params.final.full_lr, "summary": summary.to_dict(orient="records"), "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
