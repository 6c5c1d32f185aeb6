"""What the selection rule would pick among the fidelity benchmark's masks, and how that pick does at
Stage 2: a search that had proposed exactly those 16 configurations.

Reads benchmarks/results/fidelity.json (each mask at the inner budget on val and at the Stage-2
budget on test, seed 0) and the audit's full fine-tuning (3 seeds). Applies `memcontrol.pareto.select`
three times: on the front in (mem_mean_sim, kid_vs_unmasked), the search's objectives (the default);
on the front in (mem_mean_sim, kid) with each point measured against the method with no mask at its
own learning rate (the rule before); and on that front against the one at the highest learning
rate for every point (one reference for all, the rule before that). For each pick it
reports the Stage-2 flagged rate and KID as ratios of full fine-tuning's 3-seed means, the
search-signal targets (<= 0.2 and <= 1 + select.quality_tolerance).

With --workdir (the fidelity run's workdir) and --seeds, the default rule's pick is also trained
at Stage 2 at each seed (arm records under WORKDIR/benchmarks/fidelity_selection/, reused on a
rerun) and compared with the audit's arms over seeds as benchmarks/default_run.py compares the
selected mask: flagged rate and KID ratios to full fine-tuning, and Pareto dominance on (flagged
rate, KID) with the larger seed std as the tie band.

Usage: python benchmarks/fidelity_selection.py [--fidelity benchmarks/results/fidelity.json]
       [--audit benchmarks/results/default_run/audit_metrics.json] [--workdir W --seeds 0 1 2]
       [--out benchmarks/results/fidelity_selection.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol.audit.statistics import dominance
from memcontrol.config import OBJECTIVES, load_params
from memcontrol.pareto import is_pareto_front, select
from memcontrol.selection import reference_quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fidelity", type=Path, default=Path("benchmarks/results/fidelity.json"))
    ap.add_argument("--audit", type=Path, default=Path("benchmarks/results/default_run/audit_metrics.json"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--workdir", type=Path, default=None, help="train the default rule's pick at Stage 2 there")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity_selection.json"))
    args = ap.parse_args()
    params = load_params(args.params)
    fidelity = json.loads(args.fidelity.read_text())
    audit = json.loads(args.audit.read_text())
    full = audit["full"]
    mem_o = params.search.objectives[0]
    mem_k = OBJECTIVES[mem_o][0]
    df = pd.DataFrame([{"number": m["mask"], "method": fidelity["method"], "lr": m["lr"], "bits": m["bits"],
                        "trainable_pct": m["trainable_pct"], mem_o: m[f"inner.{mem_k}"],
                        "kid": m["inner.quality.kid_mean"], "kid_vs_unmasked": m["inner.kid_vs_unmasked"],
                        **{f"stage2.{k}": m[f"stage2.{k}"] for k in ("mem.flagged_rate", "mem.mean_sim", "quality.kid_mean")}}
                       for m in fidelity["masks"]])
    top_lr = df["lr"].max()
    # (name, quality column, whether every point is measured against the unmasked method at top_lr)
    rules = [("kid_vs_unmasked front, each point against its anchor (the default)", "kid_vs_unmasked", False),
             ("KID front, each point against its anchor (the rule before)", "kid", False),
             (f"KID front, one for all: unmasked at lr {top_lr:g} (the rule before that)", "kid", True)]
    picks, fronts = [], {}
    for name, q_o, one_for_all in rules:
        rule_params = params.model_copy(update={"search": params.search.model_copy(update={"objectives": (mem_o, q_o)})})
        front = df[is_pareto_front(df[[mem_o, q_o]].to_numpy(), ["minimize", "minimize"])]
        fronts[name] = front["number"].astype(int).tolist()
        reference = reference_quality(rule_params, df, front.assign(lr=top_lr) if one_for_all else front)
        row, why = select(front, mem=mem_o, quality=q_o, rule=params.select.rule,
                          quality_tolerance=params.select.quality_tolerance, reference_quality=reference)
        flagged, kid = row["stage2.mem.flagged_rate"], row["stage2.quality.kid_mean"]
        picks.append({"reference": name, "mask": int(row["number"]), "lr": float(row["lr"]), "bits": row["bits"],
                      "trainable_pct": float(row["trainable_pct"]), "inner": {mem_o: float(row[mem_o]), q_o: float(row[q_o])},
                      "stage2_flagged": float(flagged), "stage2_kid": float(kid),
                      "flagged_ratio_to_full": float(flagged / full["mem.flagged_rate"]),
                      "kid_ratio_to_full": float(kid / full["quality.kid_mean"]), "why": why})
    out = {"full_3_seeds": {"mem.flagged_rate": full["mem.flagged_rate"], "quality.kid_mean": full["quality.kid_mean"]},
           "fronts": fronts, "picks": picks,
           "targets": {"flagged_ratio": 0.2, "kid_ratio": 1 + params.select.quality_tolerance}}
    if args.workdir is not None:
        out["stage2_seeds"] = stage2_seeds(args.workdir, picks[0], args.seeds, audit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print("| reference | mask | lr | trainable % | Stage-2 flagged | Stage-2 KID | flagged / full | KID / full |")
    print("|---|---|---|---|---|---|---|---|")
    for p in picks:
        print(f"| {p['reference']} | {p['mask']} | {p['lr']:g} | {p['trainable_pct']:.1f} | {p['stage2_flagged']:.3f} | "
              f"{p['stage2_kid']:.4f} | {p['flagged_ratio_to_full']:.2f} | {p['kid_ratio_to_full']:.2f} |")
    if "stage2_seeds" in out:
        r = out["stage2_seeds"]
        print(f"pick at Stage 2 over seeds {args.seeds}: flagged {r['mem.flagged_rate']:.3f} ± {r['mem.flagged_rate.std']:.3f}, "
              f"KID {r['quality.kid_mean']:.4f} ± {r['quality.kid_mean.std']:.4f}; ratios to full {r['flagged_ratio_to_full']:.2f} / "
              f"{r['kid_ratio_to_full']:.2f}; against the audit's arms: {r['dominance']}")
    print(f"wrote {args.out}")


def stage2_seeds(workdir: Path, pick: dict, seeds: list[int], audit: dict) -> dict:
    """The pick trained at the Stage-2 budget at each seed, scored on test, against the audit's arms."""
    from memcontrol import search as S
    from memcontrol.arms import final_rows, run_arm
    from memcontrol.base_model import block_list
    from memcontrol.evaluate import EvalContext
    from memcontrol.workdir import Layout

    params = load_params(workdir / "params.yaml")
    layout = Layout(workdir)
    ctx = EvalContext(params, layout, "test")
    t = params.tuning
    bits = {S.bit_name(i): int(b) for i, b in enumerate(pick["bits"])}
    mask = S.mask_of({**bits, "lr": pick["lr"]}, block_list(params, layout), method=t.method, mode=t.mode,
                     granularity=t.granularity, options=t.options)
    rows = final_rows(params, ctx)
    runs = [run_arm(params, layout, ctx, mask, workdir / "benchmarks" / "fidelity_selection" / mask.digest() / f"seed{seed}",
                    rows=rows, steps=params.final.steps, seed=seed, batch_size=params.final.batch_size)["metrics"]
            for seed in seeds]
    keys = ("mem.flagged_rate", "quality.kid_mean")
    res = {"mask": pick["mask"], "seeds": seeds, "per_seed": [{k: m[k] for k in (*keys, "mem.mean_sim")} for m in runs]}
    for k in (*keys, "mem.mean_sim"):
        vals = [m[k] for m in runs]
        res[k], res[k + ".std"] = float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    res["flagged_ratio_to_full"] = res["mem.flagged_rate"] / audit["full"]["mem.flagged_rate"]
    res["kid_ratio_to_full"] = res["quality.kid_mean"] / audit["full"]["quality.kid_mean"]
    res["dominance"] = {arm: dominance(np.array([res[k] - m[k] for k in keys]),
                                       np.array([max(res[k + ".std"], m.get(k + ".std") or 0.0) for k in keys]))
                        for arm, m in audit.items() if isinstance(m, dict) and "+" not in arm and arm != "selected"
                        and all(k in m for k in keys)}
    return res


if __name__ == "__main__":
    main()
