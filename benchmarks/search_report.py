"""The Markdown tables of docs/search.md, printed from the committed results of
benchmarks/exhaustive.py, benchmarks/samplers.py and benchmarks/early_stopping.py (no number in
that page is typed by hand).

Usage: python benchmarks/search_report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def exhaustive(res: dict) -> list[str]:
    s = res["setting"]
    rows = [r for r in res["rows"] if r["seed"] == 0]
    out = [f"Space: {len(s['blocks'])} `{s['granularity']}` blocks of method `{s['method']}`, fixed bits {s['fixed']}, "
           f"{len(rows)} masks ({sum(r['feasible'] for r in rows)} trainable); lr {s['lr']:g}, {s['steps']} steps at batch "
           f"{s['batch_size']}, scored on {s['split']}; rungs at steps {s['rungs']}.",
           f"True front: {len(res['true_front'])} masks; hypervolume {res['true_hypervolume']:.6g} with reference point "
           f"{[round(v, 5) for v in res['reference_point']]} ({', '.join(s['objectives'])}).",
           f"Median seconds per trial: train {sorted(r['train_seconds'] for r in rows if r['feasible'])[len(rows) // 2]:.1f}, "
           f"wall {sorted(r['wall_seconds'] for r in rows if r['feasible'])[len(rows) // 2]:.1f} (incl. rung scoring)."]
    if "noise" in res:
        n = res["noise"]
        out.append(f"Noise ({n['n_masks']} masks x >= {n['n_seeds']} training seeds): seed std "
                   + ", ".join(f"{o} {v:.4f}" for o, v in n["seed_std"].items()) + "; between-mask std "
                   + ", ".join(f"{o} {v:.4f}" for o, v in n["between_mask_std"].items()) + "; ratio "
                   + ", ".join(f"{o} {v:.2f}" for o, v in n["noise_to_spread"].items()) + ".")
    return out


def samplers(res: dict) -> list[str]:
    names = list(res["samplers"])
    budgets = sorted(next(iter(res["samplers"].values()))["budgets"], key=int)
    out = ["| trials | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for b in budgets:
        cells = []
        for n in names:
            q = res["samplers"][n]["budgets"][b]
            cells.append(f"{fmt(q['median'])} [{fmt(q['q1'])}, {fmt(q['q3'])}]")
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    out.append("| trials to 95 % (median) | " + " | ".join(
        f"{res['samplers'][n]['median_trials_to_95']:g} ({res['samplers'][n]['share_reaching_95']:.0%} of seeds reach it)"
        for n in names) + " |")
    g = res.get("goal", {})
    if g:
        out.append("")
        out.append(f"Goal: 95 % in at most {g['target_trials']:g} trials (half of random's median "
                   f"{g['random_median_trials_to_95']:g}); met by: "
                   + (", ".join(n for n, ok in g["meets"].items() if ok) or "none") + ".")
    return out


def early_stopping(res: dict) -> list[str]:
    out = ["| rung (step) | " + " | ".join(k for k in next(iter(res["spearman"].values())) if k != "final_front_on_rung_front")
           + " | final front on the rung's front |", "|---|---|---|---|---|"]
    for step, rho in sorted(res["spearman"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {step} | " + " | ".join(fmt(v) for k, v in rho.items() if k != "final_front_on_rung_front")
                   + f" | {rho['final_front_on_rung_front']} |")
    out.append("")
    out.append("| trials | HV ratio off | HV ratio on | cost off (s) | cost on (s) | cost ratio |")
    out.append("|---|---|---|---|---|---|")
    off, on = res["summary"]["off"], res["summary"]["on"]
    for b in sorted(off["hv_ratio_median"], key=int):
        out.append(f"| {b} | {fmt(off['hv_ratio_median'][b])} | {fmt(on['hv_ratio_median'][b])} | "
                   f"{off['cost_seconds_median'][b]:.0f} | {on['cost_seconds_median'][b]:.0f} | "
                   f"{res['cost_ratio_at_equal_trials'][b]:.2f} |")
    ratio = res.get("cost_ratio_to_95")
    out.append("")
    def cost(x):
        return "not reached by the median seed" if x is None else f"{x:.0f} s"
    out.append(f"Trials stopped (median of a {res['setting']['max_trials']}-trial search): {on['stopped_median']:g}. "
               f"Cost to reach 95 % of the true hypervolume (median): off {cost(off['cost_to_95_median'])}, on "
               f"{cost(on['cost_to_95_median'])} ({on['share_reaching_95']:.0%} of seeds reach it with stopping, "
               f"{off['share_reaching_95']:.0%} without)" + (f", ratio {ratio:.2f}." if ratio is not None else "."))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    for name, fn in (("exhaustive", exhaustive), ("samplers", samplers), ("samplers_128", samplers),
                     ("early_stopping", early_stopping), ("early_stopping_rung80", early_stopping)):
        path = args.results / f"{name}.json"
        if path.exists():
            print(f"### {name}\n")
            print("\n".join(fn(json.loads(path.read_text()))))
            print()


if __name__ == "__main__":
    main()
