"""Stage `compare`: the Stage-2 model with the selected mask against full fine-tuning and the base
model, same data, steps, seeds and metrics. Writes reports/compare.{csv,md} and reports/metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from memcontrol.arms import full_mask
from memcontrol.config import Params
from memcontrol.report import markdown_table
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout, write_csv, write_json, write_text


def final_arms(params: Params, layout: Layout) -> dict[str, Mask]:
    return {"selected": Mask.load(layout.selected), "full": full_mask(params)}


def summarize(params: Params, layout: Layout, records: dict[str, list[dict]], base_metrics: dict | None = None) -> pd.DataFrame:
    """Mean and spread over seeds per arm, plus the held-out false-positive floor."""
    keys = ["trainable", "trainable_pct", "mem.flagged_rate", "mem.own_match_rate", "mem.mean_sim", "mem.p95_sim",
            "mem.amd", "noise_norm.max", "quality.fid", "quality.kid_mean", "wall_seconds"]
    rows = []
    for arm, recs in records.items():
        row = {"arm": arm, "n_seeds": len(recs)}
        for k in keys:
            values = np.array([r["metrics"][k] for r in recs], dtype=float)
            row[k] = float(values.mean())
            if len(values) > 1 and k not in ("trainable", "trainable_pct"):
                row[k + ".std"] = float(values.std(ddof=1))
        rows.append(row)
    if base_metrics is not None:
        rows.append({"arm": "base (no fine-tune)", "n_seeds": 1, "trainable": 0, "trainable_pct": 0.0,
                     **{k: base_metrics.get(k, float("nan")) for k in keys if k not in ("trainable", "trainable_pct")}})
    th = json.loads((layout.reference / "threshold.json").read_text())
    rows.append({"arm": "held-out real images (floor)", "n_seeds": 1,
                 "mem.flagged_rate": th["heldout_flagged_rate"], "mem.mean_sim": th["heldout_mean_sim"],
                 "mem.p95_sim": th["heldout_p95_sim"]})
    return pd.DataFrame(rows)


def write_comparison(params: Params, layout: Layout, table: pd.DataFrame) -> dict:
    """reports/compare.{csv,md} and reports/metrics.json (the DVC metrics file)."""
    write_csv(table, layout.reports / "compare.csv")
    cols = ["arm", "n_seeds", "trainable", "trainable_pct", "mem.flagged_rate", "mem.own_match_rate",
            "mem.mean_sim", "mem.p95_sim", "noise_norm.max", "quality.kid_mean", "quality.fid", "wall_seconds"]
    th = json.loads((layout.reference / "threshold.json").read_text())
    sel = json.loads(layout.selected_info.read_text()) if layout.selected_info.exists() else {}
    final = params.final
    # the selected mask's method: the search may have chosen it (tuning.method a list)
    method = Mask.load(layout.selected).method if layout.selected.exists() else params.tuning.methods[0]
    md = [
        "# Selected mask vs full fine-tuning",
        "",
        f"Method `{method}` ({params.tuning.mode} mode); selected trial {sel.get('trial', '?')}, "
        f"enabled blocks: {', '.join(sel.get('enabled_blocks', [])) or '(none)'}.",
        f"Stage 2: {final.steps} steps at batch {final.batch_size} on {final.data_size_ratio:g} of train + the "
        f"memorization subset x {final.n_repeats}; seeds: {list(final.seeds)}; memorization threshold "
        f"{th['threshold']:.4f} ({th['mode']}, quantile {th['quantile']}, embedder {th['embedder']}; held-out real "
        f"flagged rate {th.get('heldout_flagged_rate', float('nan')):.3f}, the false-positive floor).",
        "",
        markdown_table(table[[c for c in cols if c in table.columns]]),
        "",
        "mem.flagged_rate: share of memorization-prompt generations whose nearest training image passes the "
        "threshold; mem.own_match_rate: share whose nearest neighbour is the very image of that prompt. "
        "Lower is better for every column but quality's (lower KID/FID = better quality too).",
    ]
    write_text("\n".join(md) + "\n", layout.reports / "compare.md")
    metrics = {}
    for _, r in table.iterrows():
        arm = str(r["arm"]).split(" ")[0]
        metrics[arm] = {k: (None if pd.isna(v) else v) for k, v in r.items() if k not in ("arm",)}
    write_json(metrics, layout.reports / "metrics.json")
    return {"table": str(layout.reports / "compare.md"), "metrics": str(layout.reports / "metrics.json")}
