"""Issue 13 item 5: the search's coordination at lab size, with a stand-in for the trial.

Every part of the path is the real one except the trial's work: the search's ask/tell loop
(memcontrol.search.optimize, NSGA-II over the 16 SD-1.5 transformer blocks x 3 learning rates), the
study in PostgreSQL with Optuna's heartbeat (memcontrol.study_storage), each trial a Prefect task
submitted through prefect-dask's DaskTaskRunner to a `distributed.LocalCluster` of W worker
processes with 1 thread each, the Prefect API a `prefect server` on PostgreSQL, and each trial's
MLflow child run logged by the flow's own `log_trial` task to an `mlflow server` on PostgreSQL. The
stand-in trial holds Optuna's heartbeat thread as a real trial does, computes its metrics (an SVD
of a 96x96 matrix seeded by the mask), then sleeps until `--trial-seconds` have passed.

For W in --levels it runs 4 batches of W trials (the largest level, 32: 256 trials in 8 batches) and measures where
each trial's time goes; then benchmarks/lab_writers.py puts 32 concurrent writers on SQLite and on
PostgreSQL. Writes benchmarks/results/lab_scale.json and lab_scale.md (docs quote only these).

    nice -n 19 python benchmarks/lab_scale.py            # about 10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                                     os.environ.get("PYTHONPATH")]))  # Dask workers
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

from memcontrol import offline  # noqa: E402

offline.apply()

import numpy as np  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from memcontrol import study_storage  # noqa: E402

# SD-1.5's 16 transformer blocks (docs/real_model.md): the search space a lab searches
SD15_BLOCKS = tuple([f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)] + ["mid_block.attentions.0"]
                    + [f"up_blocks.{i}.attentions.{j}" for i in range(1, 4) for j in range(3)])
HEARTBEAT_INTERVAL, GRACE_PERIOD = 10, 60  # memcontrol.search.open_study's defaults


def stand_in_metrics(bits: list[int], lr: float) -> dict:
    """A trial record's metrics (the keys memcontrol.evaluate writes), from a small real computation."""
    rng = np.random.default_rng([int("".join(map(str, bits)), 2), int(lr * 1e6)])
    a = rng.standard_normal((96, 96))
    spectrum = np.linalg.svd(a @ a.T, compute_uv=False)
    on, tail = sum(bits) / len(bits), float(spectrum[-8:].sum() / spectrum.sum())
    return {"mem.flagged_rate": 0.1 + 0.5 * on * lr * 1e3, "mem.mean_sim": 0.6 + 0.3 * on + tail,
            "mem.p95_sim": 0.8 + 0.15 * on, "mem.own_match_rate": 0.2 * on, "mem.amd": 1 - on, "mem.n": 32,
            "mem.threshold": 0.9, "quality.fid": 80 - 30 * on, "quality.kid_mean": 0.05 + 0.05 * (1 - on) + tail,
            "quality.kid_std": 0.01, "quality.n": 64, "noise_norm.max": 1 + on, "noise_norm.mean": 0.5 + on}


@task(cache_policy=NO_CACHE)
def stand_in_trial(storage_url: str, trial_id: int, number: int, bits: list[int], lr: float, seconds: float,
                   log_to: dict | None = None) -> dict:
    """On a Dask worker: the trial's heartbeat (as the search's trial task holds it), its metrics,
    then a sleep to `seconds` of evaluation. With `log_to` (the variant that moves MLflow off the
    driver) the worker logs the trial's MLflow child itself (tasks.tracking.log_child)."""
    from distributed import get_worker

    entered = time.time()
    with study_storage.heartbeat(storage_url, trial_id, HEARTBEAT_INTERVAL, worker=get_worker().address):
        started = time.time()
        metrics = stand_in_metrics(bits, lr)
        computed = time.time() - started
        time.sleep(max(0.0, seconds - computed))
        ended = time.time()
    logged = 0.0
    if log_to is not None:
        from tasks import tracking

        record = {"mask": {**log_to["mask"], "bits": bits}, "metrics": metrics, "key": log_to["key"]}
        tracking.log_child(log_to["uri"], log_to["experiment"], Path(log_to["root"]), log_to["parent"],
                           name=f"trial-{number:03d}", record=record, extra_params={"trial": f"trial-{number:03d}"})
        logged = time.time() - ended
    return {"number": number, "metrics": metrics, "entered": entered, "started": started, "ended": ended,
            "left": time.time() - logged, "mlflow_on_worker": logged, "compute_seconds": computed, "pid": os.getpid()}


def _timed(fn, into: list):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)
    return wrapper


@flow(name="lab-scale-search")
def lab_search(workers: int, n_trials: int, storage_url: str, params_path: str, root: str, seconds: float,
               log_on_worker: bool = False) -> dict:
    """The search flow's loop with the stand-in trial; returns every timing and the run's ids."""
    from prefect.futures import as_completed
    from prefect.runtime import flow_run

    from flows.pipeline import log_trial
    from memcontrol import search as S
    from memcontrol.config import load_params
    from memcontrol.evaluate import objective_values
    from tasks import tracking

    params = load_params(params_path)
    name = f"lab-w{workers}" + ("-mlflow-on-workers" if log_on_worker else "")  # each run a study of its own
    study = S.open_study(storage_url, name, sampler="nsga2", seed=0, population_size=max(workers, 4),
                         directions=["minimize", "minimize"], heartbeat_interval=HEARTBEAT_INTERVAL,
                         grace_period=GRACE_PERIOD)
    timers: dict[str, list[float]] = {"ask": [], "tell": [], "evaluate": [], "log_child": []}
    study.ask, study.tell = _timed(study.ask, timers["ask"]), _timed(study.tell, timers["tell"])  # timing only
    original_log_child = tracking.log_child
    tracking.log_child = _timed(original_log_child, timers["log_child"])  # inside the driver's log_trial task
    uri = tracking.tracking_uri(params.tracking.mlflow_uri, Path(root))
    parent = tracking.parent_run(uri, params.tracking.experiment, Path(root), kind="study", name=study.study_name,
                                 params={"workers": workers, "n_trials": n_trials})
    trials, batches = [], []

    def make_mask(trial_params: dict):
        return S.mask_of(trial_params, SD15_BLOCKS, method=params.tuning.method, mode=params.tuning.mode,
                         granularity=params.tuning.granularity, options=params.tuning.options)

    def evaluate(batch):
        t0 = time.time()
        pending = {}
        for trial, mask in batch:  # as the search flow: the trial's folder, then its task on the runner
            trial.set_user_attr("trial_dir", f"search/trials/{mask.digest()}")
            submitted = time.time()
            log_to = None if not log_on_worker else {
                "uri": uri, "experiment": params.tracking.experiment, "root": root, "parent": parent,
                "mask": mask.to_dict(), "key": {"study": study.study_name, "trial": trial.number}}
            future = stand_in_trial.submit(storage_url, trial._trial_id, trial.number, list(mask.bits), mask.lr, seconds,
                                           log_to)
            pending[future] = {"trial": trial, "mask": mask, "submitted": submitted, "submit_call": time.time() - submitted}
        t_submitted = time.time()
        for future in as_completed(list(pending)):
            pending[future]["result"], pending[future]["received"] = future.result(), time.time()
        t_received = time.time()
        outcomes = []
        for entry in pending.values():
            trial, mask, result = entry["trial"], entry["mask"], entry["result"]
            record = {"mask": mask.to_dict(), "metrics": result["metrics"], "key": {"study": study.study_name,
                                                                                     "trial": trial.number}}
            m0, logged = time.time(), len(timers["log_child"])
            if not log_on_worker:  # as the search flow does: the trial's MLflow child from the driver
                log_trial(params, root, parent, f"trial-{trial.number:03d}", record, str(Path(root) / "search" / "trials"))
            log_task = time.time() - m0
            mlflow = sum(timers["log_child"][logged:])
            trials.append({**{k: v for k, v in result.items() if k != "metrics"}, "submitted": entry["submitted"],
                           "submit_call": entry["submit_call"], "received": entry["received"],
                           "batch_received": t_received, "mlflow": mlflow, "prefect_log_task": log_task - mlflow,
                           "batch": len(batches)})
            outcomes.append(S.Outcome(objective_values(params, result["metrics"]), record))
        batches.append({"start": t0, "submitted": t_submitted, "received": t_received, "end": time.time(),
                        "size": len(batch)})
        return outcomes

    t0, cpu0 = time.time(), time.process_time()
    try:
        S.optimize(study, space=S.search_space(len(SD15_BLOCKS), params.search.learning_rates), n_trials=n_trials,
                   batch_size=workers, make_mask=make_mask, evaluate=_timed(evaluate, timers["evaluate"]), seed=0)
    finally:
        tracking.log_child = original_log_child
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    return {"wall": wall, "driver_cpu": cpu, "end": time.time(), "timers": timers, "trials": trials, "batches": batches, "parent": parent,
            "study": study.study_name, "flow_run_id": str(flow_run.id)}


def _params_file(workdir: Path, mlflow_uri: str) -> Path:
    """params.yaml with MLflow pointed at the tracking server."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["mlflow_uri"] = mlflow_uri
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _warm(storage_url: str) -> None:
    """What a worker imports and opens for its first trial, before the timed run (a lab's workers
    are long-lived): the modules and its connection to the study."""
    import optuna  # noqa: F401
    import prefect.task_engine  # noqa: F401

    from memcontrol import study_storage as storage

    storage._worker_storage(storage_url, HEARTBEAT_INTERVAL)


def run_level(workers: int, args, storage_url: str, params_path: Path, workdir: Path, n_trials: int,
              log_on_worker: bool = False, cluster=None, client=None):
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from lab_checks import check_level, summarize_level

    t0 = time.time()
    if cluster is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                               dashboard_address=None)
        client = Client(cluster)
        client.run(_warm, storage_url)
    startup = time.time() - t0
    runner = DaskTaskRunner(address=cluster.scheduler_address)
    out = lab_search.with_options(task_runner=runner)(workers, n_trials, storage_url, str(params_path), str(workdir),
                                                      args.trial_seconds, log_on_worker)
    level = summarize_level(workers, n_trials, args.trial_seconds, out)
    level["mlflow_logged_by"] = "worker" if log_on_worker else "driver"
    level["cluster_start_seconds"] = round(startup, 1)
    level["checks"] = check_level(out, n_trials, storage_url, params_path, workdir)
    return level, cluster, client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,16,32", help="worker processes per run")
    ap.add_argument("--batches", type=int, default=4, help="batches of W trials per level below the largest")
    ap.add_argument("--top-trials", type=int, default=256, help="trials at the largest level (32 workers: 8 batches)")
    ap.add_argument("--trial-seconds", type=float, default=3.0, help="the stand-in trial's evaluation time")
    ap.add_argument("--worker-logging-trials", type=int, default=64,
                    help="a last run at the largest level with MLflow logged by the workers (0: skip)")
    ap.add_argument("--writer-rounds", type=int, default=4, help="ask/tell + MLflow child per writer per backend")
    ap.add_argument("--workdir", default=None, help="services' data (default: a new temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lab_scale.json"))
    ap.add_argument("--writers-only", type=int, default=0,
                    help="only the concurrent-writers comparison with this many writers, added to --out")
    ap.add_argument("--render", action="store_true", help="only recompute the model and table of --out")
    args = ap.parse_args()
    if args.writers_only:
        return writers_only(args)
    if args.render:
        _write(json.loads(Path(args.out).read_text()), args.out)
        print(Path(args.out).with_suffix(".md").read_text())
        return
    from lab_services import Services
    from lab_writers import writers

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lab_scale_"))
    levels = [int(x) for x in args.levels.split(",")]
    result = {"settings": {"levels": levels, "batches": args.batches, "top_trials": args.top_trials,
                           "trial_seconds": args.trial_seconds,
                           "heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": GRACE_PERIOD,
                           "blocks": len(SD15_BLOCKS), "sampler": "nsga2", "threads_per_worker": 1},
              "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}, "levels": []}
    t_start = time.time()
    with Services(workdir) as services, contextlib.ExitStack() as stack:
        services.postgres()
        api = services.prefect(services.database("prefect"))
        os.environ["PREFECT_API_URL"] = api  # the Dask workers inherit it; this process's settings are
        stack.enter_context(temporary_settings({PREFECT_API_URL: api}))  # read at import: set them here too
        params_path = _params_file(workdir, services.mlflow("postgresql", services.database("mlflow")))
        storage_url = services.database("optuna")
        cluster = client = None
        for workers in levels:
            if cluster is not None:
                client.close(), cluster.close()
                time.sleep(5)
            n_trials = args.top_trials if workers == max(levels) else args.batches * workers
            level, cluster, client = run_level(workers, args, storage_url, params_path, workdir, n_trials)
            result["levels"].append(level)
            _write(result, args.out)  # a partial result survives an interrupted run
            print(json.dumps({k: level[k] for k in ("workers", "n_trials", "wall_seconds", "overhead_per_trial")}),
                  flush=True)
        if args.worker_logging_trials:  # the same cluster, MLflow children logged by the workers
            result["mlflow_on_workers"], _, _ = run_level(levels[-1], args, storage_url, params_path, workdir,
                                                          args.worker_logging_trials, True, cluster, client)
            _write(result, args.out)
        if args.writer_rounds:
            result["writers"] = writers(client, services, workdir, args.writer_rounds)
        client.close(), cluster.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["machine"]["wall_minutes"] = round((time.time() - t_start) / 60, 1)
    _write(result, args.out)
    print(Path(args.out).with_suffix(".md").read_text())


def writers_only(args) -> None:
    """The SQLite / PostgreSQL comparison on its own cluster, merged into an earlier result."""
    from distributed import Client, LocalCluster

    from lab_services import Services
    from lab_writers import writers

    result = json.loads(Path(args.out).read_text())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lab_writers_"))
    result["writers"] = {}
    result["machine"]["loadavg_writers_start"] = os.getloadavg()
    with Services(workdir) as services:
        services.postgres()
        cluster = LocalCluster(n_workers=args.writers_only, threads_per_worker=1, processes=True, memory_limit=0,
                               dashboard_address=None)
        client = Client(cluster)
        try:
            writers(client, services, workdir, args.writer_rounds,
                    on_config=lambda name, out: (result["writers"].__setitem__(name, out), _write(result, args.out)))
        finally:
            client.close(), cluster.close()
    print(Path(args.out).with_suffix(".md").read_text())


def _write(result: dict, out: str) -> None:
    from lab_checks import model, render

    result["model"] = model(result["levels"], target_seconds=0.05 * 60)
    Path(out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    Path(out).with_suffix(".md").write_text(render(result))


if __name__ == "__main__":
    main()
