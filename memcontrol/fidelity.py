"""Early stopping of hopeless masks (multi-fidelity): a trial is scored at intermediate budgets
(rungs: shares of the inner loop's steps) and stopped at a rung when its point there is dominated
by a point an earlier trial had at the same rung: successive halving on the Pareto rank, for two
or more objectives (Optuna's pruners refuse multi-objective studies).

A stopped trial is told PRUNED with user attrs `stopped_at` (the step) and `partial_values` (its
objectives there); every trial that reached a rung keeps `rungs` = {step: objective values}.
Whether the intermediate points predict the final ones on the default: benchmarks/early_stopping.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from memcontrol.pareto import is_pareto_front


def rung_steps(steps: int, shares: tuple[float, ...]) -> tuple[int, ...]:
    """The step counts of the rungs: each share of `steps`, rounded, kept inside 1..steps-1."""
    return tuple(sorted({min(max(1, round(share * steps)), steps - 1) for share in shares if steps > 1}))


def dominated(point: list[float], earlier: np.ndarray, directions: list[str], min_points: int) -> bool:
    """True when `point` is dominated by one of `earlier` (n, k) and there are at least `min_points`."""
    earlier = np.asarray(earlier, dtype=float).reshape(-1, len(directions))
    if len(earlier) < min_points:
        return False
    values = np.vstack([earlier, np.asarray(point, dtype=float)[None]])
    return not bool(is_pareto_front(values, directions)[-1])


def rung_points(study: optuna.Study, step: int, exclude: int | None = None) -> np.ndarray:
    """(n, k) objective values at rung `step` of the study's trials that reached it (running, complete
    or stopped; answers to duplicates and failed trials left out)."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number == exclude or "duplicate_of" in t.user_attrs:
            continue
        value = (t.user_attrs.get("rungs") or {}).get(str(step))
        if value is not None:
            points.append(value)
    return np.asarray(points, dtype=float)


def stopper(study: optuna.Study, trial: optuna.Trial, directions: list[str], *, min_points: int,
            values_of: Callable[[dict], list[float]]) -> Callable[[int, dict], bool]:
    """The `on_rung` of memcontrol.arms.run_arm for one trial: record the rung's objective values on
    the trial (so later trials, and the same batch's, compare against it) and say whether to stop."""
    def on_rung(step: int, metrics: dict) -> bool:
        values = values_of(metrics)
        rungs = {**(trial.user_attrs.get("rungs") or {}), str(step): values}
        trial.set_user_attr("rungs", rungs)
        return dominated(values, rung_points(study, step, exclude=trial.number), directions, min_points)
    return on_rung
