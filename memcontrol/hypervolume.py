"""Hypervolume of a set of objective vectors against a fixed reference point: the measure of how
much of the true Pareto front a search has found (benchmarks/exhaustive.py, benchmarks/samplers.py).
Optuna computes the volume; this module fixes the reference point and the directions."""

from __future__ import annotations

import numpy as np
from optuna._hypervolume import compute_hypervolume

from memcontrol.pareto import is_pareto_front

# The reference point: per objective, the worst value of the exhaustive table plus this share of
# the table's range (ideal to nadir), so every trainable mask counts, the worst by a little.
REFERENCE_MARGIN = 0.1


def _as_loss(values: np.ndarray, directions) -> np.ndarray:
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(directions)) * sign


def reference_point(table: np.ndarray, directions) -> np.ndarray:
    """(k,) reference point in the objectives' own units and signs, from every point of `table`."""
    loss = _as_loss(table, directions)
    ideal, nadir = loss.min(axis=0), loss.max(axis=0)
    ref = nadir + REFERENCE_MARGIN * (nadir - ideal)
    return ref * np.array([1.0 if d == "minimize" else -1.0 for d in directions])


def hypervolume(values: np.ndarray, directions, reference: np.ndarray) -> float:
    """Volume dominated by `values` (n, k) and bounded by `reference`; points not better than the
    reference in every objective add nothing; an empty set has volume 0."""
    loss = _as_loss(values, directions)
    ref = _as_loss(reference, directions)[0]
    loss = loss[np.isfinite(loss).all(axis=1) & (loss < ref).all(axis=1)]
    if len(loss) == 0:
        return 0.0
    return float(compute_hypervolume(loss, ref))


def front_and_hypervolume(values: np.ndarray, directions, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """(n,) bool Pareto flags and the hypervolume of `values`."""
    return is_pareto_front(values, list(directions)), hypervolume(values, directions, reference)
