"""Replaying the search against the exhaustive table (benchmarks/exhaustive.py) as a lookup: the
real ask/tell loop (memcontrol.search.optimize, with its batch filling and duplicate answering) and
a real sampler (memcontrol.search.SAMPLERS), but each trial's objectives read from the table instead
of training. Shared by benchmarks/samplers.py and benchmarks/early_stopping.py."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna

from memcontrol import search as S
from memcontrol.hypervolume import hypervolume

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("memcontrol.search").setLevel(logging.ERROR)  # "the sampler repeated ..." per replay


@dataclass
class Table:
    setting: dict
    final: dict[str, list[float]]              # bits -> objective values at the full budget (seed 0)
    rungs: dict[str, dict[str, list[float]]]   # bits -> {step: objective values}
    infeasible: set[str]
    reference: np.ndarray
    true_hv: float
    seconds: dict = field(default_factory=dict)  # median train (all steps), rung evaluation, final evaluation

    @property
    def directions(self) -> list[str]:
        return self.setting["directions"]


def load_table(path: Path) -> Table:
    data = json.loads(Path(path).read_text())
    if data.get("phase") not in ("noise", "done"):
        raise SystemExit(f"{path}: the exhaustive table is not complete (phase {data.get('phase')!r})")
    objectives = data["setting"]["objectives"]
    main = [r for r in data["rows"] if r["seed"] == 0]
    final = {r["bits"]: [r["final"][o] for o in objectives] for r in main if r["feasible"]}
    rungs = {r["bits"]: {k: [v[o] for o in objectives] for k, v in r["rungs"].items()} for r in main if r["feasible"]}
    n_rungs = max(1, len(data["setting"]["rungs"]))
    seconds = {"train": float(np.median([r["train_seconds"] for r in main if r["feasible"]])),
               "rung_eval": float(np.median([r["rung_seconds"] / n_rungs for r in main if r["feasible"]])),
               "final_eval": float(np.median([r["wall_seconds"] - r["train_seconds"] - r["rung_seconds"]
                                              for r in main if r["feasible"]]))}
    return Table(setting=data["setting"], final=final, rungs=rungs,
                 infeasible={r["bits"] for r in main if not r["feasible"]},
                 reference=np.asarray(data["reference_point"]), true_hv=float(data["true_hypervolume"]),
                 seconds=seconds)


def bits_of(mask) -> str:
    return "".join(map(str, mask.bits))


def replay(table: Table, sampler: str, seed: int, *, n_trials: int, batch_size: int, population_size: int,
           evaluate=None) -> optuna.Study:
    """One search of `n_trials` distinct configurations on the table, as the search flow runs it
    (the unmasked anchor enqueued first). `evaluate(table, study, batch)` may replace the lookup
    (early stopping); the default answers each mask from the table, the all-zero mask as the real
    inner loop does (a failed trial: nothing to train)."""
    s = table.setting
    blocks = tuple(s["blocks"])
    fixed = s.get("fixed") or {}
    free = [i for i, b in enumerate(blocks) if b not in fixed]  # the searched bits; the fixed ones are set
    study = optuna.create_study(directions=s["directions"], sampler=S.SAMPLERS[sampler](seed, population_size))
    space = S.search_space(len(free), (s["lr"],))
    study.enqueue_trial(S.unmasked_params(len(free), (s["lr"],)))

    def make_mask(params: dict):
        full = {S.bit_name(i): fixed[b] for i, b in enumerate(blocks) if b in fixed}
        full.update({S.bit_name(i): params[S.bit_name(j)] for j, i in enumerate(free)})
        return S.mask_of({**full, "lr": params["lr"]}, blocks, method=s["method"], mode=s["mode"],
                         granularity=s["granularity"], options={})

    def lookup(batch):
        return [S.Outcome(None, reason="no trainable parameters") if bits_of(m) in table.infeasible
                else S.Outcome(list(table.final[bits_of(m)]), {"bits": bits_of(m)}) for _, m in batch]

    run = (lambda batch: evaluate(table, study, batch)) if evaluate is not None else lookup
    S.optimize(study, space, n_trials=n_trials, batch_size=batch_size, make_mask=make_mask, evaluate=run,
               seed=seed, max_failures=n_trials)
    return study


def scored_in_order(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that cost a configuration (completed or stopped), in the order they were asked."""
    return sorted(S.completed(study) + S.stopped(study), key=lambda t: t.number)


def hv_curve(table: Table, study: optuna.Study, n_trials: int) -> list[float]:
    """Hypervolume ratio to the true front after each of the first `n_trials` scored configurations
    (a stopped trial adds no point: its values are partial)."""
    points, out = [], []
    for t in scored_in_order(study)[:n_trials]:
        if t.state == optuna.trial.TrialState.COMPLETE:
            points.append(t.values)
        out.append(hypervolume(np.array(points), table.directions, table.reference) / table.true_hv if points else 0.0)
    return out


def first_reaching(curve: list[float], level: float) -> float:
    """Trials (1-based) until the curve first reaches `level`; inf when it never does."""
    for i, v in enumerate(curve):
        if v >= level - 1e-12:
            return float(i + 1)
    return float("inf")
