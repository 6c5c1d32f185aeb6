"""Which sampler finds the true Pareto front in the fewest trials? Each sampler of
memcontrol.search.SAMPLERS replays the search against the exhaustive table (benchmarks/replay.py:
the real ask/tell loop, no training) for many seeds; after each scored configuration, the
hypervolume of the trials so far over the true front's (fixed reference point of the table).

Writes --out (JSON: per sampler the median and quartiles of the hypervolume ratio at every budget,
trials to reach 95 % per seed and their median, and the goal: a sampler reaching 95 % in at most
half the median trials random search needs) and --plot (PNG).

Usage: python benchmarks/samplers.py [--table benchmarks/results/exhaustive.json] [--seeds 20]
       [--max-trials 64] [--batch-size 4] [--population-size 8] [--samplers random nsga2 tpe gp]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import first_reaching, hv_curve, load_table, replay  # noqa: E402

from memcontrol import search as S  # noqa: E402
from memcontrol.workdir import write_json  # noqa: E402

BUDGETS = (4, 8, 12, 16, 24, 32, 48, 64)
LEVEL = 0.95


def title(setting: dict) -> str:
    free = len(setting["blocks"]) - len(setting.get("fixed") or {})
    return (f"Exhaustive table, {free} free bits: {setting['seeds']} seeds, batch {setting['batch_size']}, "
            f"population {setting['population_size']}")


def quartiles(values: np.ndarray) -> dict:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"q1": float(q1), "median": float(med), "q3": float(q3)}


def plot(results: dict, path: Path, level: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, res in results.items():
        curves = np.array(res["curves"])
        x = np.arange(1, curves.shape[1] + 1)
        q1, med, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        ax.plot(x, med, label=f"{name} (median)")
        ax.fill_between(x, q1, q3, alpha=0.2)
    ax.axhline(level, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("distinct configurations scored (trials)")
    ax.set_ylabel("hypervolume / true front's")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=Path("benchmarks/results/exhaustive.json"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-trials", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--population-size", type=int, default=8)
    ap.add_argument("--samplers", nargs="*", default=["random", "nsga2", "tpe", "gp"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/samplers.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/images/sampler_hypervolume.png"))
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --out")
    args = ap.parse_args()
    if args.replot:
        res = json.loads(args.out.read_text())
        plot(res["samplers"], args.plot, res["setting"]["level"], title(res["setting"]))
        return
    torch.set_num_threads(1)
    table = load_table(args.table)
    results = {}
    for name in args.samplers:
        t0 = time.perf_counter()
        curves, reach = [], []
        for seed in range(args.seeds):
            study = replay(table, name, seed, n_trials=args.max_trials, batch_size=args.batch_size,
                           population_size=args.population_size)
            curve = hv_curve(table, study, args.max_trials)
            curves.append(curve)
            reach.append(first_reaching(curve, LEVEL))
        curves_a = np.array(curves)
        reach_a = np.array(reach)
        results[name] = {
            "curves": curves_a.round(5).tolist(),
            "budgets": {str(b): quartiles(curves_a[:, b - 1]) for b in BUDGETS if b <= args.max_trials},
            "trials_to_95": [None if not np.isfinite(r) else int(r) for r in reach],
            # seeds that never reach 95 % within max_trials count as max_trials + 1 (a lower bound)
            "median_trials_to_95": float(np.median(np.where(np.isfinite(reach_a), reach_a, args.max_trials + 1))),
            "share_reaching_95": float(np.isfinite(reach_a).mean()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{name}: median trials to {LEVEL:.0%} = {results[name]['median_trials_to_95']}, "
              f"{results[name]['seconds']} s", flush=True)
    goal = {}
    if "random" in results:
        target = results["random"]["median_trials_to_95"] / 2
        goal = {"random_median_trials_to_95": results["random"]["median_trials_to_95"],
                "target_trials": target,
                "meets": {n: r["median_trials_to_95"] <= target for n, r in results.items() if n != "random"}}
    write_json({"table": args.table.as_posix(), "setting": {**table.setting, "seeds": args.seeds,
                                                             "max_trials": args.max_trials,
                                                             "batch_size": args.batch_size,
                                                             "population_size": args.population_size,
                                                             "level": LEVEL, "true_hypervolume": table.true_hv,
                                                             "reference_point": table.reference.tolist()},
                "goal": goal, "samplers": results}, args.out)
    plot(results, args.plot, LEVEL, title(json.loads(args.out.read_text())["setting"]))


if __name__ == "__main__":
    main()
