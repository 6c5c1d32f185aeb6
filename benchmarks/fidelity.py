"""Does the inner loop carry signal? The same masks trained at the inner-loop budget (what every
search trial does, scored on val) and at the Stage-2 budget (scored on test), and the Spearman rank
correlation of each objective between the two; plus the seed-to-seed noise of the inner loop for
fixed masks against the spread between masks.

Masks: the method with no mask at every learning rate of the grid, then seeded random configurations
of the search space (bits + learning rate) until --n masks. Every arm is an ordinary arm record
(memcontrol/arms.py), so a killed run resumes where it stopped.

Usage: python benchmarks/fidelity.py WORKDIR [--n 16] [--noise-seeds 5] [--trials WORKDIR/search/trials.csv]
       [--out benchmarks/results/fidelity.json]
WORKDIR is a finished `memcontrol demo` workdir (its params.yaml, base model and reference are used).
The signal table covers mem_mean_sim, kid and kid_vs_unmasked whatever the workdir's search.objectives
(the arms do not depend on them); --trials may come from another demo run of the same data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from memcontrol import search as S
from memcontrol.arms import final_rows, run_arm, search_rows
from memcontrol.base_model import block_list
from memcontrol.config import load_params
from memcontrol.evaluate import EvalContext
from memcontrol.report import markdown_table
from memcontrol.workdir import Layout

KEYS = ["mem.mean_sim", "mem.flagged_rate", "mem.own_match_rate", "quality.kid_mean", "quality.fid"]


def masks_to_try(params, blocks: tuple[str, ...], n: int) -> list:
    t = params.tuning
    make = lambda bits, lr: S.mask_of({**{S.bit_name(i): b for i, b in enumerate(bits)}, "lr": lr}, blocks,
                                      method=t.method, mode=t.mode, granularity=t.granularity, options=t.options)
    out = [make([1] * len(blocks), lr) for lr in params.search.learning_rates]
    rng = np.random.default_rng(1234)
    seen = {m.digest() for m in out}
    while len(out) < n:
        bits = rng.integers(0, 2, len(blocks))
        if not bits.any():
            continue
        mask = make(bits.tolist(), float(rng.choice(params.search.learning_rates)))
        if mask.digest() not in seen:
            seen.add(mask.digest())
            out.append(mask)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--noise-seeds", type=int, default=5)
    ap.add_argument("--noise-masks", type=int, default=2, help="fixed masks whose seed noise is measured")
    ap.add_argument("--trials", type=Path, default=None, help="a demo search's trials.csv (spread between its trials)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    layout = Layout(args.workdir)
    inner_ctx, final_ctx = EvalContext(params, layout, "val"), EvalContext(params, layout, "test")
    inner_rows, stage2_rows = search_rows(params, inner_ctx), final_rows(params, final_ctx)
    masks = masks_to_try(params, block_list(params, layout), args.n)
    root = args.workdir / "benchmarks" / "fidelity"
    t0 = time.perf_counter()
    rows = []
    for i, mask in enumerate(masks):
        inner = run_arm(params, layout, inner_ctx, mask, root / "inner" / mask.digest(), rows=inner_rows,
                        steps=params.train.steps, seed=params.seed)["metrics"]
        stage2 = run_arm(params, layout, final_ctx, mask, root / "stage2" / mask.digest(), rows=stage2_rows,
                         steps=params.final.steps, seed=params.seed, batch_size=params.final.batch_size)["metrics"]
        rows.append({"mask": i, "bits": "".join(map(str, mask.bits)), "lr": mask.lr,
                     "trainable_pct": round(inner["trainable_pct"], 3),
                     **{f"inner.{k}": inner[k] for k in KEYS}, **{f"stage2.{k}": stage2[k] for k in KEYS}})
        print(f"mask {i + 1}/{len(masks)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    correlation = {}
    for k in KEYS:
        rho, p = spearmanr(table[f"inner.{k}"], table[f"stage2.{k}"])
        correlation[k] = {"spearman": float(rho), "p": float(p)}

    # seed-to-seed noise of the inner loop for fixed masks, against the spread between masks: the
    # anchors (every block on) at the first --noise-masks learning rates, and at each of those LRs
    # the first mask with blocks off, whose KID over its anchor's at the same seed is the relative
    # quality objective's noise (a search runs every trial, anchors included, at one seed)
    anchors = masks[: args.noise_masks]
    masked = [next(m for m in masks if m.lr == a.lr and not all(m.bits)) for a in anchors]
    noise_rows = []
    for mask in anchors + masked:
        for seed in range(args.noise_seeds):
            m = run_arm(params, layout, inner_ctx, mask, root / "noise" / f"{mask.digest()}-seed{seed}",
                        rows=inner_rows, steps=params.train.steps, seed=seed)["metrics"]
            noise_rows.append({"bits": "".join(map(str, mask.bits)), "lr": mask.lr, "seed": seed, **{k: m[k] for k in KEYS}})
    noise = pd.DataFrame(noise_rows)
    plain = noise[noise["bits"].isin(["".join(map(str, m.bits)) for m in anchors])]
    # quality over the anchor's at the same LR: for the masks table (both budgets, seed 0) and per seed
    unmasked = table["bits"].str.fullmatch("1+")
    for budget in ("inner", "stage2"):
        kid = table[f"{budget}.quality.kid_mean"]
        table[f"{budget}.kid_vs_unmasked"] = kid / table["lr"].map(kid[unmasked].set_axis(table["lr"][unmasked]))
    rho, p = spearmanr(table["inner.kid_vs_unmasked"], table["stage2.kid_vs_unmasked"])
    correlation["kid_vs_unmasked"] = {"spearman": float(rho), "p": float(p)}
    rho, p = spearmanr(table["inner.kid_vs_unmasked"], table["stage2.quality.kid_mean"])
    correlation["kid_vs_unmasked (inner) vs quality.kid_mean (stage 2)"] = {"spearman": float(rho), "p": float(p)}
    unmasked_runs = noise["bits"].str.fullmatch("1+")
    by_seed = noise[unmasked_runs].set_index(["lr", "seed"])["quality.kid_mean"]
    ratios = noise[~unmasked_runs].copy()
    ratios["kid_vs_unmasked"] = [r["quality.kid_mean"] / by_seed[(r["lr"], r["seed"])] for _, r in ratios.iterrows()]
    measures = {  # objective -> (frame with its seed runs, column there, column of the masks table, demo column)
        "mem_mean_sim": (plain, "mem.mean_sim", "inner.mem.mean_sim", "mem.mean_sim"),
        "kid": (plain, "quality.kid_mean", "inner.quality.kid_mean", "quality.kid_mean"),
        "kid_vs_unmasked": (ratios, "kid_vs_unmasked", "inner.kid_vs_unmasked", "kid_vs_unmasked"),
    }
    signal = {}
    demo = pd.read_csv(args.trials) if args.trials and args.trials.exists() else None
    for name, (runs, column, masks_column, demo_column) in measures.items():
        seed_std = float(runs.groupby(["bits", "lr"])[column].std(ddof=1).mean())
        between = float(table[masks_column].std(ddof=1))
        entry = {"seed_std": seed_std, "spread_between_masks_std": between, "ratio_masks": between / seed_std,
                 "noise_masks": sorted(set(runs["bits"] + "@" + runs["lr"].map("{:g}".format)))}
        if demo is not None and demo_column in demo:
            entry["spread_between_demo_trials_std"] = float(demo[demo_column].std(ddof=1))
            entry["ratio_demo_trials"] = entry["spread_between_demo_trials_std"] / seed_std
        signal[name] = entry

    show = table[["mask", "bits", "lr", "trainable_pct", "inner.mem.mean_sim", "stage2.mem.mean_sim",
                  "stage2.mem.flagged_rate", "inner.quality.kid_mean", "stage2.quality.kid_mean"]]
    print(markdown_table(show))
    print(markdown_table(pd.DataFrame([{"metric": k, **v} for k, v in correlation.items()])))
    print(markdown_table(pd.DataFrame([{"objective": k, **v} for k, v in signal.items()])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "inner": {"steps": params.train.steps, "batch_size": params.train.batch_size, "split": "val"},
        "stage2": {"steps": params.final.steps, "batch_size": params.final.batch_size, "split": "test"},
        "method": params.tuning.method, "mode": params.tuning.mode, "granularity": params.tuning.granularity,
        "n_masks": len(masks), "spearman": correlation, "signal": signal,
        "masks": table.to_dict("records"), "noise": noise_rows, "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
