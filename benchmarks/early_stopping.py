"""Does stopping hopeless masks early pay? Two questions, answered on the exhaustive table
(benchmarks/exhaustive.py, which scored every mask at 1/4 and 1/2 of the inner steps as well):

1. Do the intermediate points predict the final ones? Spearman rank correlation, over every mask,
   of each objective at each rung with its final value, and of the Pareto rank (non-dominated
   sorting depth) at the rung with the final Pareto rank.
2. The search with and without the stopping rule (memcontrol/fidelity.py: a trial whose point at a
   rung is dominated by an earlier trial's point at that rung is stopped), replayed on the table with
   the real loop and sampler (benchmarks/replay.py) for many seeds: the hypervolume ratio reached
   and the cost paid. Cost in seconds from the table's own median timings: a trial without the rule
   pays training + one evaluation; with it, the steps it ran, one evaluation per rung reached and,
   if it completes, the final evaluation.

Usage: python benchmarks/early_stopping.py [--table benchmarks/results/exhaustive.json] [--sampler tpe]
       [--seeds 20] [--max-trials 64] [--min-trials 4] [--out benchmarks/results/early_stopping.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import bits_of, first_reaching, hv_curve, load_table, replay, scored_in_order  # noqa: E402

from memcontrol import fidelity as F  # noqa: E402
from memcontrol import search as S  # noqa: E402
from memcontrol.pareto import is_pareto_front  # noqa: E402
from memcontrol.workdir import write_json  # noqa: E402

LEVEL = 0.95
BUDGETS = (8, 16, 32, 64)


def pareto_depth(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """Non-dominated sorting: 1 for the front, 2 for the front of the rest, ..."""
    depth = np.zeros(len(values), dtype=int)
    left = np.arange(len(values))
    level = 1
    while len(left):
        front = is_pareto_front(values[left], directions)
        depth[left[front]] = level
        left = left[~front]
        level += 1
    return depth


def predictiveness(table) -> dict:
    bits = sorted(table.final)
    objectives = table.setting["objectives"]
    final = np.array([table.final[b] for b in bits])
    out = {}
    for step in map(str, table.setting["rungs"]):
        at = np.array([table.rungs[b][step] for b in bits])
        rho = {o: float(spearmanr(at[:, i], final[:, i]).statistic) for i, o in enumerate(objectives)}
        rho["pareto_rank"] = float(spearmanr(pareto_depth(at, table.directions),
                                             pareto_depth(final, table.directions)).statistic)
        front = is_pareto_front(final, table.directions)
        kept = is_pareto_front(at, table.directions)
        rho["final_front_on_rung_front"] = f"{int((front & kept).sum())}/{int(front.sum())}"
        out[step] = rho
    return out


def stopping_evaluate(min_points: int):
    """The replay's evaluation with the stopping rule: each rung's point from the table, judged by
    memcontrol.fidelity.stopper against the study's earlier points at that rung."""
    def evaluate(table, study, batch):
        out = []
        for trial, mask in batch:
            b = bits_of(mask)
            if b in table.infeasible:
                out.append(S.Outcome(None, reason="no trainable parameters"))
                continue
            on_rung = F.stopper(study, trial, table.directions, min_points=min_points, values_of=lambda v: v)
            stop = next((int(s) for s in sorted(table.rungs[b], key=int) if on_rung(int(s), table.rungs[b][s])), None)
            values = table.rungs[b][str(stop)] if stop else table.final[b]
            out.append(S.Outcome(list(values), {"bits": b}, stopped_at=stop))
        return out
    return evaluate


def costs(table, study, n_trials: int, stopping: bool) -> list[float]:
    """Cumulative cost in seconds after each scored configuration."""
    sec, steps, n_rungs = table.seconds, table.setting["steps"], len(table.setting["rungs"])
    total, out = 0.0, []
    for t in scored_in_order(study)[:n_trials]:
        if not stopping:
            total += sec["train"] + sec["final_eval"]
        elif t.state == optuna.trial.TrialState.PRUNED:
            at = t.user_attrs["stopped_at"]
            total += sec["train"] * at / steps + sec["rung_eval"] * sum(r <= at for r in table.setting["rungs"])
        else:
            total += sec["train"] + sec["rung_eval"] * n_rungs + sec["final_eval"]
        out.append(total)
    return out


def finite(x):
    return None if isinstance(x, float) and not np.isfinite(x) else x


def cost_to_reach(curve: list[float], cost: list[float], level: float) -> float:
    n = first_reaching(curve, level)
    return cost[int(n) - 1] if np.isfinite(n) else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=Path("benchmarks/results/exhaustive.json"))
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-trials", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--population-size", type=int, default=8)
    ap.add_argument("--min-trials", type=int, default=4)
    ap.add_argument("--rungs", type=int, nargs="*", default=None, help="use only these rungs (steps) of the table")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/early_stopping.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = load_table(args.table)
    if args.rungs is not None:
        table.setting["rungs"] = [r for r in table.setting["rungs"] if r in args.rungs]
        table.rungs = {b: {k: v for k, v in r.items() if int(k) in args.rungs} for b, r in table.rungs.items()}
    runs = {"off": [], "on": []}
    for seed in range(args.seeds):
        for mode in runs:
            study = replay(table, args.sampler, seed, n_trials=args.max_trials, batch_size=args.batch_size,
                           population_size=args.population_size,
                           evaluate=stopping_evaluate(args.min_trials) if mode == "on" else None)
            curve = hv_curve(table, study, args.max_trials)
            cost = costs(table, study, args.max_trials, mode == "on")
            runs[mode].append({"curve": curve, "cost": cost, "n_stopped": len(S.stopped(study)),
                               "cost_to_95": cost_to_reach(curve, cost, LEVEL)})
    summary = {}
    for mode, rs in runs.items():
        curves, cost = np.array([r["curve"] for r in rs]), np.array([r["cost"] for r in rs])
        reach = np.array([r["cost_to_95"] for r in rs])
        summary[mode] = {
            "hv_ratio_median": {str(b): float(np.median(curves[:, b - 1])) for b in BUDGETS if b <= args.max_trials},
            "cost_seconds_median": {str(b): float(np.median(cost[:, b - 1])) for b in BUDGETS if b <= args.max_trials},
            "stopped_median": float(np.median([r["n_stopped"] for r in rs])),
            "share_reaching_95": float(np.isfinite(reach).mean()),
            "cost_to_95_median": finite(float(np.median(reach))),  # None: the median seed never reaches it
        }
    ratio = {str(b): summary["on"]["cost_seconds_median"][str(b)] / summary["off"]["cost_seconds_median"][str(b)]
             for b in BUDGETS if b <= args.max_trials}
    write_json({"table": args.table.as_posix(),
                "setting": {"sampler": args.sampler, "seeds": args.seeds, "max_trials": args.max_trials,
                            "batch_size": args.batch_size, "population_size": args.population_size,
                            "min_trials": args.min_trials, "rungs": table.setting["rungs"],
                            "steps": table.setting["steps"], "seconds": table.seconds, "level": LEVEL},
                "spearman": predictiveness(table), "summary": summary,
                "cost_ratio_at_equal_trials": ratio,
                "cost_ratio_to_95": (summary["on"]["cost_to_95_median"] / summary["off"]["cost_to_95_median"]
                                     if summary["on"]["cost_to_95_median"] and summary["off"]["cost_to_95_median"]
                                     else None),
                "runs": {m: [{k: (np.round(v, 4).tolist() if isinstance(v, list) else finite(v)) for k, v in r.items()}
                             for r in rs] for m, rs in runs.items()}}, args.out)
    print(summary, ratio, flush=True)


if __name__ == "__main__":
    main()
