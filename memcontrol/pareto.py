"""Pareto front and the rule that picks one mask from it. Pure numpy/pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd


def is_pareto_front(values: np.ndarray, directions: list[str] | tuple[str, ...]) -> np.ndarray:
    """values (n, k) float, directions k x {"minimize", "maximize"} -> (n,) bool.

    A point is on the front when no other point is at least as good in every objective and
    strictly better in one (the definition of optuna's Study.best_trials). Ties are all kept.
    A row with a NaN objective is never on the front (optuna fails such trials)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(directions):
        raise ValueError(f"values must be (n, {len(directions)}), got {v.shape}")
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    bad = np.isnan(v).any(axis=1)
    v = np.where(np.isnan(v), np.inf, v * sign)
    le = (v[:, None, :] <= v[None, :, :]).all(-1)  # le[j, i]: j weakly better than i everywhere
    lt = (v[:, None, :] < v[None, :, :]).any(-1)
    dominated = ((le & lt) & ~bad[:, None]).any(axis=0)
    return ~dominated & ~bad


def select(front: pd.DataFrame, *, mem: str, quality: str, rule: str, quality_tolerance: float,
           reference_quality: float | pd.Series | None = None) -> tuple[pd.Series, dict]:
    """Pick one row of a Pareto front whose objective columns `mem` and `quality` are minimised.
    Returns (row, why): `why` records what the rule compared, for selected_info.json.

    least_memorization_within_quality: least memorization among the points whose quality is at
      most `reference_quality + quality_tolerance * |reference_quality|`, the reference being an
      arm the search measured itself (not the front's best, which collapses near 0): one value, or
      one per front row (a Series on the front's index: each point's own anchor); if no point
      qualifies, the best-quality point, and `why` says so;
    best_quality: the best-quality point;
    knee: the point closest to the utopia point after min-max scaling both objectives."""
    if front.empty:
        raise ValueError("select: the Pareto front is empty (no completed trial)")
    q = front[quality].astype(float)
    m = front[mem].astype(float)
    if rule == "best_quality":
        return front.loc[q.idxmin()], {"rule": rule}
    if rule == "least_memorization_within_quality":
        ref = (pd.Series(float(reference_quality), index=front.index) if np.isscalar(reference_quality)
               else reference_quality)
        if ref is not None:
            ref = ref.reindex(front.index).astype(float)
        if ref is None or not np.isfinite(ref.to_numpy()).all():
            raise ValueError("select: rule least_memorization_within_quality needs the reference quality of every point")
        limit = ref + quality_tolerance * ref.abs()
        ok = front[q <= limit]
        refs = sorted({float(v) for v in ref})
        why = {"rule": rule, "reference_quality": refs[0] if len(refs) == 1 else refs,
               "quality_tolerance": quality_tolerance, "n_within": int(len(ok))}
        if len(refs) == 1:
            why["quality_limit"] = float(limit.iloc[0])
        if ok.empty:
            return front.loc[q.idxmin()], {**why, "fallback": "no front point within the limit: best quality"}
        return ok.loc[ok[mem].astype(float).idxmin()], why
    if rule == "knee":
        def scale(series: pd.Series) -> pd.Series:
            span = series.max() - series.min()
            return (series - series.min()) / span if span > 0 else series * 0
        d = np.hypot(scale(m), scale(q))
        return front.loc[d.idxmin()], {"rule": rule}
    raise ValueError(f"select: unknown rule `{rule}`")
