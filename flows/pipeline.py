"""Prefect flows, one per stage (the same chain `dvc repro` runs), plus `demo` that runs them all."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from memcontrol import search as S
from memcontrol import stages
from memcontrol.config import OBJECTIVES, Params, load_params
from tasks import stages as T
from tasks import tracking

log = logging.getLogger(__name__)


def _setup(params_path: str, root: str | None) -> tuple[Params, str, stages.Layout]:
    p = load_params(params_path)
    r = str(Path(root or p.workdir).resolve())
    return p, r, stages.Layout(Path(r))


@flow(name="prepare")
def prepare(params_path: str = "params.yaml", root: str | None = None) -> str:
    p, r, _ = _setup(params_path, root)
    return T.prepare(p, r)


@flow(name="base")
def base(params_path: str = "params.yaml", root: str | None = None) -> str:
    p, r, _ = _setup(params_path, root)
    return T.base(p, r)


@flow(name="reference")
def reference(params_path: str = "params.yaml", root: str | None = None) -> str:
    p, r, _ = _setup(params_path, root)
    return T.reference(p, r)


def _data_digest(L: stages.Layout) -> str:
    return T.digest(str(L.reference)) + T.digest(str(L.base))


@task(cache_policy=NO_CACHE)
def log_trial(p: Params, root: str, parent_id: str, number: int, record: dict, trial_dir: str) -> str:
    """One MLflow child run per trial."""
    uri = tracking.tracking_uri(p.tracking.mlflow_uri, Path(root))
    return tracking.log_child(uri, p.tracking.experiment, Path(root), parent_id, name=f"trial-{number:03d}",
                              record=record, artifacts=[Path(trial_dir) / "grid.png"],
                              extra_params={"trial": number})


@flow(name="search")
def search(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The outer loop: ask a batch of masks, fine-tune + score each, tell, until n_trials complete.
    The study lives in SQLite, so a rerun after a crash or kill continues it."""
    p, r, L = _setup(params_path, root)
    blocks = stages.blocks_of(p, L)
    directions = [OBJECTIVES[o][1] for o in p.search.objectives]
    study = S.open_study(L.study_db, p.search.study_name, sampler=p.search.sampler, seed=p.search.seed,
                         population_size=p.search.population_size, directions=directions)
    study.set_user_attr("blocks", list(blocks))
    S.recover_interrupted(study)
    uri = tracking.tracking_uri(p.tracking.mlflow_uri, Path(r))
    parent = tracking.parent_run(uri, p.tracking.experiment, Path(r), kind="study", name=p.search.study_name,
                                 params={"method": p.tuning.method, "mode": p.tuning.mode, "sampler": p.search.sampler,
                                         "seed": p.search.seed, "n_trials": p.search.n_trials,
                                         "objectives": ",".join(p.search.objectives), "blocks": ",".join(blocks),
                                         "inner_steps": p.train.steps})
    digest = _data_digest(L)
    space = S.search_space(len(blocks), p.search.lr_min, p.search.lr_max)
    while (left := p.search.n_trials - S.n_finished(study)) > 0:
        batch = S.ask_batch(study, space, min(p.search.batch_size, left))
        for trial in batch:
            mask = S.mask_of(trial.params, blocks, method=p.tuning.method, mode=p.tuning.mode,
                             granularity=p.tuning.granularity, options=p.tuning.options)
            out = L.trials / mask.digest()
            trial.set_user_attr("trial_dir", str(out.relative_to(L.root)))
            try:
                rec = T.run_arm(p, r, mask.to_json(), str(out), arm="trial", seed=p.seed, steps=p.train.steps,
                                data_digest=digest)
            except Exception as e:  # one broken candidate must not end the study
                log.exception("trial %d failed", trial.number)
                S.tell(study, trial, None, reason=f"{type(e).__name__}: {e}")
                continue
            trial.set_user_attr("record", json.dumps(rec, default=str))
            S.tell(study, trial, stages.objective_values(p, rec["metrics"]))
            log_trial(p, r, parent, trial.number, rec, str(out))
    sel = stages.pareto_and_select(p, L, study)
    tracking.log_files(uri, p.tracking.experiment, Path(r), parent,
                       [L.search / "pareto.csv", L.search / "trials.csv", L.search / "pareto.png", L.selected],
                       metrics={"selected_trial": sel["trial"], "n_complete": S.n_finished(study)}, finish=True)
    return {"study": str(L.study_db), "selected": str(L.selected), "trial": sel["trial"]}


@flow(name="select")
def select(params_path: str = "params.yaml", root: str | None = None) -> str:
    """Re-run only the selection rule over the finished study (e.g. after changing select.*)."""
    p, r, L = _setup(params_path, root)
    directions = [OBJECTIVES[o][1] for o in p.search.objectives]
    study = S.open_study(L.study_db, p.search.study_name, sampler=p.search.sampler, seed=p.search.seed,
                         population_size=p.search.population_size, directions=directions)
    return str(stages.pareto_and_select(p, L, study)["mask"])


@flow(name="finetune")
def finetune(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """Stage 2: fine-tune with the selected mask on the final (memorization-inducing) set, for each final seed."""
    p, r, L = _setup(params_path, root)
    mask = stages.final_arms(p, L)["selected"]
    digest = _data_digest(L)
    recs = {}
    for seed in p.final.seeds:
        out = L.final / f"seed{seed}"
        recs[seed] = T.run_arm(p, r, mask.to_json(), str(out), arm="final", seed=seed, steps=p.final.steps,
                               data_digest=digest)
    return {"final": str(L.final), "seeds": list(recs)}


@flow(name="compare")
def compare(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The selected mask's final model against full fine-tuning (same data, steps, seeds, metrics)
    and the base model; table to reports/ and MLflow."""
    p, r, L = _setup(params_path, root)
    digest = _data_digest(L)
    arms = stages.final_arms(p, L)
    records: dict[str, list[dict]] = {"selected": [], "full": []}
    for seed in p.final.seeds:
        sel_dir = L.final / f"seed{seed}"
        records["selected"].append(T.run_arm(p, r, arms["selected"].to_json(), str(sel_dir), arm="final",
                                             seed=seed, steps=p.final.steps, data_digest=digest))
        records["full"].append(T.run_arm(p, r, arms["full"].to_json(), str(L.root / "models" / "full" / f"seed{seed}"),
                                         arm="final", seed=seed, steps=p.final.steps, data_digest=digest))
    base_metrics = T.evaluate_base(p, r)
    table = stages.summarize(p, L, records, base_metrics)
    out = stages.write_comparison(p, L, table, records)
    log_comparison(p, r, records)
    return out


@task(cache_policy=NO_CACHE)
def log_comparison(p: Params, root: str, records: dict[str, list[dict]]) -> str:
    """An MLflow `compare` parent run with one child per arm and seed, plus the report files."""
    L = stages.Layout(Path(root))
    uri = tracking.tracking_uri(p.tracking.mlflow_uri, Path(root))
    parent = tracking.parent_run(uri, p.tracking.experiment, Path(root), kind="compare", name=p.search.study_name,
                                 params={"final_steps": p.final.steps, "seeds": list(p.final.seeds)})
    for arm, recs in records.items():
        for seed, rec in zip(p.final.seeds, recs):
            tracking.log_child(uri, p.tracking.experiment, Path(root), parent, name=f"{arm}-seed{seed}", record=rec,
                               extra_params={"arm": arm, "seed": seed})
    tracking.log_files(uri, p.tracking.experiment, Path(root), parent,
                       [L.reports / "compare.md", L.reports / "compare.csv", L.reports / "metrics.json",
                        L.reports / "base_samples.png"], finish=True)
    return parent


@flow(name="demo")
def demo(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The whole chain on one process: prepare -> base -> reference -> search -> finetune -> compare.
    Each stage's wall time goes to reports/demo_timings.json (the summary prints it)."""
    _, _, L = _setup(params_path, root)
    out, seconds = {}, {}
    for fl in (prepare, base, reference, search, finetune, compare):
        t0 = time.perf_counter()
        res = fl(params_path, root)
        seconds[fl.name] = round(time.perf_counter() - t0, 1)
        if isinstance(res, dict):
            out.update(res)
    stages.write_json({"order": list(seconds), "seconds": seconds}, L.reports / "demo_timings.json")
    return out
