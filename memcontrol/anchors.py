"""Anchors: the method with no mask (every block on) at each learning rate of the grid, scored
first by the search. A relative objective (config.RELATIVE, e.g. kid_vs_unmasked) is a trial's raw
value divided by its anchor's: how much of what the unmasked method learns in the same steps the
mask keeps (docs/search.md "The quality objective")."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState


def is_anchor(trial_params: dict) -> bool:
    """Every block on: the method with no mask, an anchor (`memcontrol.search.anchor_params`)."""
    bits = [v for k, v in trial_params.items() if k not in ("lr", "method")]
    return bool(bits) and all(int(v) == 1 for v in bits)


def anchor_of(scored: list[FrozenTrial], trial_params: dict) -> FrozenTrial | None:
    """The anchor among `scored` (completed trials) at the learning rate (and method) of
    `trial_params`, or None."""
    key = (trial_params.get("method"), float(trial_params["lr"]))
    for t in scored:
        if is_anchor(t.params) and (t.params.get("method"), float(t.params["lr"])) == key and "raw_values" in t.user_attrs:
            return t
    return None


def relative_values(scored: list[FrozenTrial], trial_params: dict, raw: list[float],
                    relative: tuple[int, ...]) -> tuple[list[float] | None, str]:
    """The values told for a trial whose objectives at positions `relative` are divided by its
    anchor's (an anchor's own are 1): (values, "") or (None, why not)."""
    anchor = raw if is_anchor(trial_params) else getattr(anchor_of(scored, trial_params), "user_attrs", {}).get("raw_values")
    if anchor is None:
        return None, (f"no scored anchor (every block on at lr {trial_params['lr']:g}) to divide the relative "
                      "objective by; it failed or was never enqueued")
    if any(not anchor[i] > 0 for i in relative):
        return None, (f"the anchor at lr {trial_params['lr']:g} has a non-positive quality value {anchor}: a ratio "
                      "to it means nothing; use the plain objective (kid, fid) in search.objectives")
    return [v / anchor[i] if i in relative else v for i, v in enumerate(raw)], ""


def pending_anchors(study: optuna.Study) -> tuple[int, int]:
    """(waiting, running) anchors: trials with relative objectives wait until every anchor is scored."""
    waiting = running = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        fixed = t.params if t.state == TrialState.RUNNING else t.system_attrs.get("fixed_params", {})
        if fixed and is_anchor(fixed):
            waiting += t.state == TrialState.WAITING
            running += t.state == TrialState.RUNNING
    return waiting, running


def unscored(study: optuna.Study, anchors: list[dict]) -> list[dict]:
    """The anchors (parameter dicts) that failed and have no completed, waiting or running trial:
    on a resume, one that failed before (the search stopped on it) is run again."""
    def key(fixed: dict) -> tuple:
        return tuple(sorted((k, float(v) if k == "lr" else v) for k, v in fixed.items()))

    held = {key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))}
    held |= {key(t.system_attrs.get("fixed_params", {})) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    tried = {key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return [a for a in anchors if key(a) in tried and key(a) not in held]
