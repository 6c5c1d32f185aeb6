"""Prefect flows, one per stage (the same chain `dvc repro` runs), plus `demo` that runs them all."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import parallel
from memcontrol import fidelity as F
from memcontrol import search as S
from memcontrol import study_storage
from memcontrol.anchors import unscored
from memcontrol.compare import final_arms, summarize, write_comparison
from memcontrol.config import OBJECTIVES, RELATIVE, Params, load_params
from memcontrol.evaluate import objective_values
from memcontrol.method_choice import options_for, search_blocks
from memcontrol.selection import pareto_and_select
from memcontrol.workdir import Layout, write_json
from tasks import stages as T
from tasks import tracking
from tasks.progress import SearchProgress, bars

log = logging.getLogger(__name__)


def _setup(params_path: str, root: str | None) -> tuple[Params, str, Layout]:
    params = load_params(params_path)
    workdir = str(Path(root or params.workdir).resolve())
    return params, workdir, Layout(Path(workdir))


@flow(name="prepare")
def prepare(params_path: str = "params.yaml", root: str | None = None) -> str:
    params, workdir, _ = _setup(params_path, root)
    return T.prepare(params, workdir)


@flow(name="base")
def base(params_path: str = "params.yaml", root: str | None = None, force_pretrain: bool = False) -> str:
    params, workdir, _ = _setup(params_path, root)
    return T.base(params, workdir, force_pretrain=force_pretrain)


@flow(name="reference")
def reference(params_path: str = "params.yaml", root: str | None = None) -> str:
    params, workdir, _ = _setup(params_path, root)
    return T.reference(params, workdir)


@task(cache_policy=NO_CACHE)
def log_trial(params: Params, root: str, parent_id: str, name: str, record: dict, trial_dir: str) -> str:
    """One MLflow child run per trial."""
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, Path(root))
    return tracking.log_child(uri, params.tracking.experiment, Path(root), parent_id, name=name,
                              record=record, artifacts=[Path(trial_dir) / "grid.png", Path(trial_dir) / "samples.png"],
                              extra_params={"trial": name})


def _study_url(params: Params, layout: Layout) -> str:
    """search.storage, or the SQLite file search/study.db of the workdir."""
    return study_storage.resolve_url(params.search.storage, layout.root, layout.study_db)


def _open_study(params: Params, layout: Layout, blocks: tuple[str, ...] | None = None):
    """The study; with `blocks` (the search itself) a resume under other settings is refused."""
    directions = [OBJECTIVES[o][1] for o in params.search.objectives]
    settings = None if blocks is None else S.resume_settings(params, blocks)
    return S.open_study(_study_url(params, layout), params.search.study_name, sampler=params.search.sampler,
                        seed=params.search.seed, population_size=params.search.population_size, directions=directions,
                        settings=settings, heartbeat_interval=params.search.heartbeat_interval,
                        grace_period=params.search.grace_period)


@flow(name="search")
def search(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The outer loop: ask a batch of masks, fine-tune + score each on val, tell, until n_trials
    distinct configurations are scored (memcontrol.search.optimize; a proposal equal to a scored one
    is answered from it). First the anchors: the method with no mask at each learning rate of the
    grid, which the selection rule measures each trial's quality against. The study lives in SQLite (or search.storage): a rerun
    continues it; a second search on the same study file while one runs is refused
    (memcontrol.search.study_lock). search.workers > 1 runs that many trials at once on Dask
    (flows/parallel.py, docs/scale_out.md)."""
    params, workdir, layout = _setup(params_path, root)
    file = study_storage.sqlite_file(_study_url(params, layout))
    with S.study_lock(file) if file is not None else contextlib.nullcontext():
        return _search(params, workdir, layout, exclusive=file is not None)


def _search(params: Params, workdir: str, layout: Layout, exclusive: bool = True) -> dict:
    blocks = search_blocks(params, layout)
    study = _open_study(params, layout, blocks)
    study.set_user_attr("blocks", list(blocks))
    if exclusive:  # the study file's lock is ours: a RUNNING trial was left by a search that died
        study_storage.recover_orphans(study)
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, layout.root)
    parent = tracking.parent_run(uri, params.tracking.experiment, layout.root, kind="study",
                                 name=study.study_name,
                                 params={"method": ",".join(params.tuning.methods), "mode": params.tuning.mode,
                                         "sampler": params.search.sampler, "seed": params.search.seed,
                                         "n_trials": params.search.n_trials,
                                         "objectives": ",".join(params.search.objectives), "blocks": ",".join(blocks),
                                         "inner_steps": params.train.steps})
    with bars() as progress:  # on a terminal the trials' bars sit under the search's own
        return _search_loop(params, workdir, layout, study, blocks, uri, parent,
                            SearchProgress(progress, study, params.search.n_trials, params.search.objectives))


def _search_loop(params: Params, workdir: str, layout: Layout, study, blocks, uri: str, parent: str,
                 tracker: SearchProgress) -> dict:
    methods = params.tuning.methods
    space = S.search_space(len(blocks), params.search.learning_rates, methods)
    # the method with no mask at each LR first: the anchors the rule measures against; then the rest
    # of the first generation: random bits, the learning rates in equal shares (S.optimize keeps
    # this plan on a new study). On a resume, an anchor that failed (the search stopped on it) runs again.
    anchors = S.anchor_params(len(blocks), params.search.learning_rates, methods)
    first = anchors + S.initial_design(min(params.search.population_size, params.search.n_trials) - len(anchors),
                                       params.search.learning_rates, methods, params.search.seed)
    for fixed in unscored(study, anchors):
        study.enqueue_trial(fixed)
    # early stopping (memcontrol/fidelity.py): scored at each rung, stopped when dominated there
    stopping = params.search.early_stopping
    rungs = F.rung_steps(params.train.steps, stopping.rungs) if stopping.enabled else ()
    directions = [OBJECTIVES[o][1] for o in params.search.objectives]

    def make_mask(trial_params: dict):
        method = trial_params.get("method", methods[0])
        return S.mask_of(trial_params, blocks, method=method, mode=params.tuning.mode,
                         granularity=params.tuning.granularity,
                         options=options_for(method, dict(params.tuning.options), methods))

    def evaluate(batch) -> list[S.Outcome]:
        outcomes = []
        for position, (trial, mask) in enumerate(batch):
            tracker.trial_started(position)
            out = layout.trials / mask.digest()
            trial.set_user_attr("trial_dir", str(out.relative_to(layout.root)))
            anchor = all(mask.bits)  # the selection rule's reference at its LR: never stopped early
            on_rung = (F.stopper(study, trial, directions, min_points=stopping.min_trials,
                                 values_of=lambda metrics: objective_values(params, metrics))
                       if rungs and not anchor else None)
            try:
                with study_storage.beating(study, trial._trial_id):  # Optuna's heartbeat while it runs
                    rec = T.run_arm(params, workdir, mask.to_json(), str(out), arm="trial", seed=params.seed,
                                    steps=params.train.steps, rungs=rungs, on_rung=on_rung)
            except Exception as e:  # one broken candidate must not end the study
                log.exception("trial %d failed", trial.number)
                outcomes.append(S.Outcome(None, reason=f"{type(e).__name__}: {e}"))
                continue
            if rec.get("rungs"):  # also when the arm was reused and on_rung never ran
                trial.set_user_attr("rungs", {k: objective_values(params, m) for k, m in rec["rungs"].items()})
            outcomes.append(S.Outcome(objective_values(params, rec["metrics"]), rec, stopped_at=rec.get("stopped_at")))
            log_trial(params, workdir, parent, f"trial-{trial.number:03d}", rec, str(out))
        return outcomes

    def optimize(evaluate) -> None:
        S.optimize(study, space, n_trials=params.search.n_trials, batch_size=params.search.batch_size,
                   make_mask=make_mask, evaluate=evaluate, seed=params.search.seed,
                   max_failures=params.search.max_failures,
                   relative=tuple(i for i, o in enumerate(params.search.objectives) if o in RELATIVE), first=first,
                   # after each batch is told: trial k of n, the front so far, an ETA (tasks/progress.py)
                   on_told=tracker.told)

    if params.search.workers == 1:
        optimize(evaluate)
    else:  # the same loop; each batch's trials run at once, one per Dask worker
        with parallel.trial_runner(params.search) as runner:
            optimize(lambda batch: parallel.evaluate(
                runner, params, workdir, _study_url(params, layout), batch,
                logged=lambda trial, rec, out: log_trial(params, workdir, parent, f"trial-{trial.number:03d}", rec,
                                                         out)))
    sel = pareto_and_select(params, layout, study)
    tracking.log_files(uri, params.tracking.experiment, layout.root, parent,
                       [layout.search / "pareto.csv", layout.search / "trials.csv", layout.search / "pareto.png",
                        layout.selected],
                       metrics={"selected_trial": sel["trial"], "n_complete": S.n_finished(study)}, finish=True)
    url = _study_url(params, layout)
    return {"study": str(study_storage.sqlite_file(url) or study_storage.shown(url)), "selected": str(layout.selected), "trial": sel["trial"]}


@flow(name="select")
def select(params_path: str = "params.yaml", root: str | None = None) -> str:
    """Re-run only the selection rule over the finished study (e.g. after changing select.*)."""
    params, _, layout = _setup(params_path, root)
    return str(pareto_and_select(params, layout, _open_study(params, layout))["mask"])


@flow(name="finetune")
def finetune(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """Stage 2: fine-tune with the selected mask on the final (memorization-inducing) set, for each final seed."""
    params, workdir, layout = _setup(params_path, root)
    mask = final_arms(params, layout)["selected"]
    recs = {}
    with bars() as progress:
        for i, seed in enumerate(params.final.seeds):
            progress("Stage 2: seeds", i, len(params.final.seeds))
            out = layout.final / f"seed{seed}"
            recs[seed] = T.run_arm(params, workdir, mask.to_json(), str(out), arm="final", seed=seed,
                                   steps=params.final.steps)
        progress("Stage 2: seeds", len(recs), len(params.final.seeds))
    return {"final": str(layout.final), "seeds": list(recs)}


@flow(name="compare")
def compare(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The selected mask's final model against full fine-tuning (same data, steps, seeds, metrics)
    and the base model; table to reports/ and MLflow."""
    params, workdir, layout = _setup(params_path, root)
    arms = final_arms(params, layout)
    records: dict[str, list[dict]] = {"selected": [], "full": []}
    total = 2 * len(params.final.seeds)
    with bars() as progress:
        for seed in params.final.seeds:
            for arm, out in (("selected", layout.final), ("full", layout.full)):
                progress("compare: arm-seeds", sum(map(len, records.values())), total)
                records[arm].append(T.run_arm(params, workdir, arms[arm].to_json(), str(out / f"seed{seed}"),
                                              arm="final", seed=seed, steps=params.final.steps))
        progress("compare: arm-seeds", total, total)
    base_metrics = T.evaluate_base(params, workdir)
    table = summarize(params, layout, records, base_metrics)
    out = write_comparison(params, layout, table)
    log_comparison(params, workdir, records)
    return out


@task(cache_policy=NO_CACHE)
def log_comparison(params: Params, root: str, records: dict[str, list[dict]]) -> str:
    """An MLflow `compare` parent run with one child per arm and seed, plus the report files."""
    layout = Layout(Path(root))
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, layout.root)
    parent = tracking.parent_run(uri, params.tracking.experiment, layout.root, kind="compare",
                                 name=params.search.study_name,
                                 params={"final_steps": params.final.steps, "seeds": list(params.final.seeds)})
    for arm, recs in records.items():
        for seed, rec in zip(params.final.seeds, recs):
            tracking.log_child(uri, params.tracking.experiment, layout.root, parent, name=f"{arm}-seed{seed}",
                               record=rec, extra_params={"arm": arm, "seed": seed})
    tracking.log_files(uri, params.tracking.experiment, layout.root, parent,
                       [layout.reports / "compare.md", layout.reports / "compare.csv", layout.reports / "metrics.json",
                        layout.reports / "base_samples.png"], finish=True)
    return parent


@flow(name="demo")
def demo(params_path: str = "params.yaml", root: str | None = None) -> dict:
    """The whole chain on one process: prepare -> base -> reference -> search -> finetune -> compare.
    Each stage's wall time goes to reports/demo_timings.json (the summary prints it)."""
    _, _, layout = _setup(params_path, root)
    out, seconds = {}, {}
    for stage in (prepare, base, reference, search, finetune, compare):
        t0 = time.perf_counter()
        res = stage(params_path, root)
        seconds[stage.name] = round(time.perf_counter() - t0, 1)
        if isinstance(res, dict):
            out.update(res)
    timings = {"order": list(seconds), "seconds": seconds}
    if os.environ.get("MEMCONTROL_SETUP_SECONDS"):  # scripts/demo.sh times its setup step
        timings["setup_seconds"] = float(os.environ["MEMCONTROL_SETUP_SECONDS"])
    write_json(timings, layout.reports / "demo_timings.json")
    return out
