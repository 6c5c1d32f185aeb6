"""The embedded default, measured: collect one finished run (`memcontrol demo`, then
`bash scripts/run_audit.sh`) plus benchmarks/results/{fidelity,full_ft_lr}.json into
benchmarks/results/default_run/ and check each criterion of the search-signal work against it:

1. fine-tuning has something to learn: base KID >= 2 x full fine-tuning's (Stage 2, test split);
3. full fine-tuning memorizes: flagged >= 50 % (mean over the audit's seeds), floor <= 5 %;
4. the inner loop carries signal: Spearman >= 0.6 (memorization), >= 0.5 (quality); the demo's
   spread between trials >= 3 x the seed noise of a fixed mask;
5. the selected mask wins: flagged <= 1/5 of full's, KID <= (1 + select.quality_tolerance) x full's,
   and it dominates (or ties within the seed std) full fine-tuning and >= 2 other unmasked methods;
7. timings (demo stages).

Usage: python benchmarks/default_run.py WORKDIR [--timings FRESH/reports/demo_timings.json]
       [--out benchmarks/results/default_run]
Writes OUT/summary.json (the checks) and copies the run's reports next to it; prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol.audit.statistics import dominance
from memcontrol.config import load_params
from memcontrol.report import markdown_table

RESULTS = Path(__file__).parent / "results"
COPY = ["reports/demo_timings.json", "reports/metrics.json", "reports/compare.md", "reports/audit.md",
        "reports/audit_metrics.json", "data/reference/threshold.json", "search/trials.csv", "search/pareto.csv",
        "masks/selected_info.json", "transfer/reports/transfer.md", "transfer/reports/transfer_metrics.json",
        "release/summary.json"]
MEM, KID = "mem.flagged_rate", "quality.kid_mean"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=RESULTS / "default_run")
    ap.add_argument("--timings", type=Path, default=None,
                    help="demo_timings.json of a timed run (a fresh clone's `bash scripts/demo.sh` on an idle "
                         "machine); default: the workdir's own")
    args = ap.parse_args()
    params = load_params(args.params)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for rel in COPY:
        src = args.workdir / rel
        if src.exists():  # release/summary.json -> release_summary.json (summary.json is ours)
            name = "release_summary.json" if rel == "release/summary.json" else Path(rel).name
            if src.suffix in (".md", ".json", ".csv"):  # this machine's workdir path -> <workdir>
                (out / name).write_text(src.read_text().replace(str(args.workdir.resolve()), "<workdir>"))
            else:
                shutil.copyfile(src, out / name)

    compare = _json(args.workdir / "reports/metrics.json")
    audit = _json(args.workdir / "reports/audit_metrics.json")
    threshold = _json(args.workdir / "data/reference/threshold.json")
    fidelity = _json(RESULTS / "fidelity.json")
    checks = []

    def check(item: str, what: str, value, target: str, ok: bool | None):
        checks.append({"item": item, "what": what, "value": value, "target": target,
                       "verdict": "n/a" if ok is None else ("holds" if ok else "does not hold")})

    base = compare.get("base", {})
    full = audit.get("full") or compare.get("full", {})
    if base and full:
        ratio = base[KID] / full[KID]
        check("1", "base KID / full fine-tuning KID (test)", round(ratio, 2), ">= 2", ratio >= 2)
    if "full" in audit:
        f = audit["full"]
        check("3", "full fine-tuning flagged rate, mean (std) over seeds",
              f"{f[MEM]:.3f} ({f.get(MEM + '.std') or 0:.3f})", ">= 0.5", f[MEM] >= 0.5)
    spread = threshold.get("heldout_floor_spread", {})
    if spread:
        check("3", f"held-out floor over {spread['n_splits']} val/test splits of {spread['n_images']} images: "
                   "mean (p10-p90)", f"{spread['mean']:.3f} ({spread['p10']:.3f}-{spread['p90']:.3f})",
              "<= 0.05", spread["mean"] <= 0.05)
    for key, target in (("mem.mean_sim", 0.6), ("mem.flagged_rate", None), ("quality.kid_mean", 0.5),
                        ("kid_vs_unmasked", 0.5)):
        rho = fidelity.get("spearman", {}).get(key, {}).get("spearman")
        if rho is not None:
            check("4", f"Spearman inner vs Stage 2: {key}", round(rho, 3), f">= {target}" if target else "(reported)",
                  None if target is None else rho >= target)
    for name, entry in fidelity.get("signal", {}).items():  # the search's objectives are held to it
        ratio = entry.get("ratio_demo_trials", entry.get("ratio_masks"))
        searched = name in params.search.objectives
        check("4", f"spread between demo trials / seed noise: {name}" + ("" if searched else " (not searched)"),
              round(ratio, 2), ">= 3" if searched else "(reported)", ratio >= 3 if searched else None)
    if "selected" in audit and "full" in audit:
        s, f = audit["selected"], audit["full"]
        tol = params.select.quality_tolerance
        check("5", "selected flagged / full flagged", round(s[MEM] / max(f[MEM], 1e-12), 3), "<= 0.2",
              s[MEM] <= 0.2 * f[MEM])
        check("5", "selected KID / full KID", round(s[KID] / f[KID], 3), f"<= {1 + tol:g}", s[KID] <= (1 + tol) * f[KID])
        others = [a for a in audit if "+" not in a and a not in ("selected", "full")]
        outcome = {a: dominance(np.array([s[k] - audit[a][k] for k in (MEM, KID)]),  # seed std as the tie band
                                np.array([max(s.get(k + ".std") or 0.0, audit[a].get(k + ".std") or 0.0) for k in (MEM, KID)]))
                   for a in ["full", *others]}
        wins = [a for a, v in outcome.items() if v in ("dominates", "ties")]
        check("5", "selected vs each unmasked arm on (flagged, KID): " +
              ", ".join(f"{a} {v}" for a, v in outcome.items()), len(wins),
              ">= 3 incl. full (the method unmasked)", "full" in wins and len(wins) >= 3)
    demo = _json(args.timings or args.workdir / "reports/demo_timings.json")
    if args.timings:
        shutil.copyfile(args.timings, out / "demo_timings.json")
    if demo:
        total = demo.get("wall_seconds", sum(demo["seconds"].values()))
        check("7", "memcontrol demo wall (min); stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in demo["seconds"].items()),
              round(total / 60, 1), "<= 13", total <= 13 * 60)
        if "setup_seconds" in demo:
            with_setup = total + demo["setup_seconds"]
            check("7", f"bash scripts/demo.sh from a fresh clone, setup {demo['setup_seconds']:.0f} s included (min)",
                  round(with_setup / 60, 1), "<= 16", with_setup <= 16 * 60)

    summary = {"workdir": "<workdir>", "checks": checks,
               "stage2": {arm: {k: m.get(k) for k in (MEM, MEM + ".std", KID, KID + ".std", "quality.fid",
                                                      "mem.mean_sim", "trainable_pct")}
                          for arm, m in {**compare, **audit}.items() if isinstance(m, dict) and arm != "held-out"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(markdown_table(pd.DataFrame(checks)))


if __name__ == "__main__":
    main()
