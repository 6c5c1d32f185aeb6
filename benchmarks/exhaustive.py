"""Ground truth for the search: every mask of the 7-block `transformer` space (or of the blocks
left free by --fixed; the committed table fixes down_blocks.0.attentions.0 on: 64 masks), trained and scored
exactly as a search trial is (memcontrol.arms.run_arm on the inner loop's rows, `train.steps` at
`train.batch_size`, scored on val), at one learning rate; the objectives also at intermediate
budgets (rungs, default 1/4 and 1/2 of the steps) for the multi-fidelity study; then a subset of
masks again at other training seeds for the noise.

Every arm is an ordinary arm record under WORKDIR/benchmarks/exhaustive/seed<k>/<digest>/ (written
atomically, last), so a killed run resumes where it stopped. The table (one row per mask and seed,
objectives at each rung and at the end, timings), the true Pareto front and its hypervolume go to
--out after every arm; the hypervolume uses a fixed reference point (memcontrol.hypervolume).

The all-zero mask trains nothing; a search trial with it fails (no trainable parameters), and the
table records it as infeasible without training.

Usage: python benchmarks/exhaustive.py WORKDIR [--lr 1e-3] [--granularity transformer] [--fixed BLOCK=BIT ...]
       [--rungs 0.25 0.5] [--noise-masks 8] [--noise-seeds 1 2] [--out benchmarks/results/exhaustive.json]
WORKDIR holds params.yaml and the prepared data, base model and reference (stages prepare/base/reference).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from memcontrol import search as S
from memcontrol.arms import run_arm, search_rows
from memcontrol.base_model import block_list
from memcontrol.config import OBJECTIVES, load_params
from memcontrol.evaluate import EvalContext, objective_values
from memcontrol.hypervolume import front_and_hypervolume, reference_point
from memcontrol.workdir import Layout, write_json


def all_masks(params, blocks: tuple[str, ...], lr: float, seed: int, fixed: dict[str, int] | None = None) -> list:
    """Every bit pattern (those with the `fixed` blocks' bits, if any), in a seeded order (a run cut
    short holds a random subset, not a corner)."""
    t = params.tuning
    fixed = fixed or {}
    patterns = [p for p in itertools.product((0, 1), repeat=len(blocks))
                if all(p[blocks.index(b)] == v for b, v in fixed.items())]
    order = np.random.default_rng(seed).permutation(len(patterns))
    return [S.mask_of({**{S.bit_name(i): b for i, b in enumerate(patterns[k])}, "lr": lr}, blocks, method=t.method,
                      mode=t.mode, granularity=t.granularity, options=t.options) for k in order]


def noise_subset(rows: list[dict], n: int, seed: int) -> list[str]:
    """bits of `n` masks to repeat: the true front first (the best region), then seeded others."""
    feasible = [r for r in rows if r["feasible"] and r["seed"] == 0]
    front = [r["bits"] for r in feasible if r["pareto"]]
    rest = [r["bits"] for r in feasible if not r["pareto"]]
    rng = np.random.default_rng(seed)
    picked = front[: n // 2 + 1]
    picked += [rest[i] for i in rng.permutation(len(rest))[: n - len(picked)]]
    return picked[:n]


def summarize(rows: list[dict], objectives: list[str], directions: list[str]) -> dict:
    main = [r for r in rows if r["seed"] == 0 and r["feasible"]]
    out: dict = {}
    if len(main) < 2:
        return out
    final = np.array([[r["final"][o] for o in objectives] for r in main])
    ref = reference_point(final, directions)
    on_front, hv = front_and_hypervolume(final, directions, ref)
    for r, p in zip(main, on_front):
        r["pareto"] = bool(p)
    out["reference_point"] = ref.tolist()
    out["true_front"] = sorted(r["bits"] for r in main if r["pareto"])
    out["true_hypervolume"] = hv
    noisy = {}
    for r in rows:
        if r["feasible"]:
            noisy.setdefault(r["bits"], []).append([r["final"][o] for o in objectives])
    repeated = {b: np.array(v) for b, v in noisy.items() if len(v) >= 2}
    if repeated:
        seed_std = np.mean([v.std(axis=0, ddof=1) for v in repeated.values()], axis=0)
        between_std = final.std(axis=0, ddof=1)
        out["noise"] = {"n_masks": len(repeated), "n_seeds": int(min(len(v) for v in repeated.values())),
                        "seed_std": dict(zip(objectives, seed_std.tolist())),
                        "between_mask_std": dict(zip(objectives, between_std.tolist())),
                        "noise_to_spread": dict(zip(objectives, (seed_std / between_std).tolist()))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--granularity", default="transformer")
    ap.add_argument("--rungs", type=float, nargs="*", default=[0.25, 0.5], help="intermediate budgets, share of steps")
    ap.add_argument("--noise-masks", type=int, default=8)
    ap.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--limit", type=int, default=None, help="stop after this many masks (timing runs)")
    ap.add_argument("--fixed", nargs="*", default=[], metavar="BLOCK=BIT",
                    help="blocks whose bit is fixed: the space is the other blocks' 2^(n-k) patterns")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exhaustive.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.workdir / "params.yaml")
    params = params.model_copy(update={"tuning": params.tuning.model_copy(update={"granularity": args.granularity})})
    layout = Layout(args.workdir)
    ctx = EvalContext(params, layout, "val")
    rows_in = search_rows(params, ctx)
    blocks = block_list(params, layout)
    objectives = list(params.search.objectives)
    directions = [OBJECTIVES[o][1] for o in objectives]
    steps = params.train.steps
    rungs = tuple(sorted({int(round(f * steps)) for f in args.rungs}))
    root = args.workdir / "benchmarks" / "exhaustive"
    fixed = {b: int(v) for b, v in (f.rsplit("=", 1) for f in args.fixed)}
    unknown = sorted(set(fixed) - set(blocks))
    if unknown:
        raise SystemExit(f"--fixed: no block {unknown}; blocks: {list(blocks)}")
    masks = all_masks(params, blocks, args.lr, params.seed, fixed)[: args.limit]
    rows: list[dict] = []
    setting = {"method": params.tuning.method, "mode": params.tuning.mode, "granularity": args.granularity,
               "blocks": list(blocks), "lr": args.lr, "steps": steps, "batch_size": params.train.batch_size,
               "fixed": fixed, "rungs": list(rungs), "objectives": objectives, "directions": directions, "split": "val",
               "data_size_ratio": params.data.data_size_ratio, "n_repeats": params.data.n_repeats}
    t0 = time.perf_counter()

    def one(mask, seed: int) -> None:
        bits = "".join(map(str, mask.bits))
        if not any(mask.bits):
            rows.append({"bits": bits, "seed": seed, "feasible": False, "reason": "no trainable parameters"})
            return
        rec = run_arm(params, layout, ctx, mask, root / f"seed{seed}" / mask.digest(), rows=rows_in, steps=steps,
                      seed=seed, rungs=rungs)
        m = rec["metrics"]
        rows.append({"bits": bits, "seed": seed, "feasible": True, "pareto": False,
                     "enabled": [b for b, on in zip(blocks, mask.bits) if on],
                     "trainable_pct": m["trainable_pct"],
                     "final": dict(zip(objectives, objective_values(params, m))),
                     "rungs": {k: dict(zip(objectives, objective_values(params, v))) for k, v in rec["rungs"].items()},
                     "train_seconds": m["train_seconds"] - m.get("rung_seconds", 0.0),
                     "rung_seconds": m.get("rung_seconds", 0.0), "wall_seconds": m["wall_seconds"]})

    def save(phase: str) -> None:
        summary = summarize(rows, objectives, directions)
        write_json({"setting": setting, "phase": phase, "n_rows": len(rows), **summary,
                    "elapsed_seconds": round(time.perf_counter() - t0, 1), "rows": rows}, args.out)

    for i, mask in enumerate(masks):
        one(mask, 0)
        save("masks")
        print(f"mask {i + 1}/{len(masks)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.limit is None:
        by_bits = {"".join(map(str, m.bits)): m for m in masks}
        for bits in noise_subset(rows, args.noise_masks, params.seed):
            for seed in args.noise_seeds:
                one(by_bits[bits], seed)
                save("noise")
                print(f"noise {bits} seed {seed} ({time.perf_counter() - t0:.0f} s)", flush=True)
    save("done" if args.limit is None else "partial")


if __name__ == "__main__":
    main()
