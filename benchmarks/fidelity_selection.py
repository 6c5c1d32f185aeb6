"""What the selection rule would pick among the fidelity benchmark's masks, and how that pick does at
Stage 2: a search that had proposed exactly those 16 configurations.

Reads benchmarks/results/fidelity.json (each mask at the inner budget on val and at the Stage-2
budget on test, seed 0) and the audit's full fine-tuning (3 seeds). Applies `memcontrol.pareto.select`
to the inner points' Pareto front twice: with each point measured against the method with no mask
at its own learning rate (the default, `select.quality_reference: unmasked`) and against the one at
the highest learning rate for every point (one reference for all, the rule before). For each pick it
reports the Stage-2 flagged rate and KID as ratios of full fine-tuning's 3-seed means, the
search-signal targets (<= 0.2 and <= 1 + select.quality_tolerance).

Usage: python benchmarks/fidelity_selection.py [--fidelity benchmarks/results/fidelity.json]
       [--audit benchmarks/results/default_run/audit_metrics.json] [--out benchmarks/results/fidelity_selection.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from memcontrol.config import OBJECTIVES, load_params
from memcontrol.pareto import is_pareto_front, select
from memcontrol.selection import reference_quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fidelity", type=Path, default=Path("benchmarks/results/fidelity.json"))
    ap.add_argument("--audit", type=Path, default=Path("benchmarks/results/default_run/audit_metrics.json"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity_selection.json"))
    args = ap.parse_args()
    params = load_params(args.params)
    fidelity = json.loads(args.fidelity.read_text())
    full = json.loads(args.audit.read_text())["full"]
    mem_o, q_o = params.search.objectives
    mem_k, q_k = OBJECTIVES[mem_o][0], OBJECTIVES[q_o][0]
    df = pd.DataFrame([{"number": m["mask"], "method": fidelity["method"], "lr": m["lr"], "bits": m["bits"],
                        "trainable_pct": m["trainable_pct"], mem_o: m[f"inner.{mem_k}"], q_o: m[f"inner.{q_k}"],
                        **{f"stage2.{k}": m[f"stage2.{k}"] for k in ("mem.flagged_rate", "mem.mean_sim", "quality.kid_mean")}}
                       for m in fidelity["masks"]])
    directions = [OBJECTIVES[o][1] for o in params.search.objectives]
    front = df[is_pareto_front(df[[mem_o, q_o]].to_numpy(), directions)]
    top_lr = df["lr"].max()
    references = {"per learning rate (default)": reference_quality(params, df, front),
                  f"one for all: unmasked at lr {top_lr:g}": reference_quality(params, df, front.assign(lr=top_lr))}
    picks = []
    for name, reference in references.items():
        row, why = select(front, mem=mem_o, quality=q_o, rule=params.select.rule,
                          quality_tolerance=params.select.quality_tolerance, reference_quality=reference)
        flagged, kid = row["stage2.mem.flagged_rate"], row["stage2.quality.kid_mean"]
        picks.append({"reference": name, "mask": int(row["number"]), "lr": float(row["lr"]), "bits": row["bits"],
                      "trainable_pct": float(row["trainable_pct"]), "inner": {mem_o: float(row[mem_o]), q_o: float(row[q_o])},
                      "stage2_flagged": float(flagged), "stage2_kid": float(kid),
                      "flagged_ratio_to_full": float(flagged / full["mem.flagged_rate"]),
                      "kid_ratio_to_full": float(kid / full["quality.kid_mean"]), "why": why})
    out = {"full_3_seeds": {"mem.flagged_rate": full["mem.flagged_rate"], "quality.kid_mean": full["quality.kid_mean"]},
           "front": front["number"].astype(int).tolist(), "picks": picks,
           "targets": {"flagged_ratio": 0.2, "kid_ratio": 1 + params.select.quality_tolerance}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print("| reference | mask | lr | trainable % | Stage-2 flagged | Stage-2 KID | flagged / full | KID / full |")
    print("|---|---|---|---|---|---|---|---|")
    for p in picks:
        print(f"| {p['reference']} | {p['mask']} | {p['lr']:g} | {p['trainable_pct']:.1f} | {p['stage2_flagged']:.3f} | "
              f"{p['stage2_kid']:.4f} | {p['flagged_ratio_to_full']:.2f} | {p['kid_ratio_to_full']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
