"""32 concurrent writers, the pattern of a search whose workers write to the study (each trial's
heartbeat and worker attribute) and, if a flow let them, to MLflow: one writer per Dask worker
process, all starting at once, each doing `rounds` x (ask, heartbeat, user attr, tell on the
Optuna study; one MLflow child run through tasks.tracking.log_child). Run against
- sqlite: the study in an SQLite file, MLflow through an `mlflow server` on SQLite;
- sqlite-direct: the study in an SQLite file, MLflow straight into an SQLite file (the default
  `tracking.mlflow_uri`, no server);
- postgresql: both on PostgreSQL (MLflow through an `mlflow server`).
Every failed operation is counted by its error; afterwards the stores are read back, so a write
that was reported failed but landed (or the reverse) shows as lost or extra."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

STUDY = "writers"


def _err(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    for known in ("database is locked", "disk I/O error", "too many connections", "timed out", "Max retries",
                  "INTERNAL_ERROR", "could not obtain lock", "UNIQUE constraint"):
        if known.lower() in str(e).lower():
            text = known
    return f"{type(e).__name__}: {text[:80]}"


def writer(index: int, study_url: str, mlflow_uri: str, experiment: str, root: str, parent: str, rounds: int,
           start_at: float) -> list[dict]:
    """On one Dask worker: the writes of `rounds` trials; each operation's time and error."""
    import optuna

    from memcontrol import study_storage
    from tasks import tracking

    time.sleep(max(0.0, start_at - time.time()))
    ops = []
    for r in range(rounds):
        t0, error = time.time(), None
        try:
            storage = study_storage.open_storage(study_url, heartbeat_interval=10, grace_period=60)
            study = optuna.load_study(study_name=STUDY, storage=storage, sampler=optuna.samplers.RandomSampler())
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            storage.record_heartbeat(trial._trial_id)
            storage.set_trial_user_attr(trial._trial_id, "worker", index)
            study.tell(trial, [trial.params["x"], 1 - trial.params["x"]])
        except Exception as e:  # noqa: BLE001 - counted, by its error
            error = _err(e)
        ops.append({"kind": "study", "seconds": time.time() - t0, "error": error})
        t0, error = time.time(), None
        record = {"mask": {"method": "lora", "mode": "full", "lr": 1e-4, "bits": [index % 2] * 16,
                           "blocks": [f"block{i}" for i in range(16)]},
                  "metrics": {f"m{i}": float(i + r) for i in range(13)}, "key": [index, r]}
        try:
            tracking.log_child(mlflow_uri, experiment, Path(root), parent, name=f"w{index:02d}-r{r}", record=record)
        except Exception as e:  # noqa: BLE001
            error = _err(e)
        ops.append({"kind": "mlflow", "seconds": time.time() - t0, "error": error})
    return ops


def _stats(ops: list[dict]) -> dict:
    seconds = sorted(o["seconds"] for o in ops)
    q = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else seconds * 19
    return {"ok": sum(o["error"] is None for o in ops), "failed": sum(o["error"] is not None for o in ops),
            "p50": statistics.median(seconds), "p95": q[18], "max": seconds[-1]}


def run_config(client, study_url: str, mlflow_uri: str, root: Path, rounds: int, timeout: float = 240) -> dict:
    import optuna
    from distributed import wait
    from mlflow.tracking import MlflowClient

    from memcontrol import study_storage
    from tasks import tracking

    storage = study_storage.open_storage(study_url, heartbeat_interval=10, grace_period=60)
    optuna.create_study(study_name=STUDY, storage=storage, directions=["minimize", "minimize"])
    experiment = "writers"
    parent = tracking.parent_run(mlflow_uri, experiment, root, kind="study", name=STUDY, params={})
    addresses = sorted(client.scheduler_info()["workers"])
    start_at = time.time() + 5
    t0 = time.time()
    futures = [client.submit(writer, i, study_url, mlflow_uri, experiment, str(root), parent, rounds, start_at,
                             workers=[a], allow_other_workers=False, pure=False) for i, a in enumerate(addresses)]
    done, not_done = wait(futures, timeout=timeout)
    ops = [o for f in done if f.status == "finished" for o in f.result()]
    for f in not_done:
        f.cancel()
    wall = time.time() - t0 - 5
    errors: dict[str, int] = {}
    for o in ops:
        if o["error"]:
            errors[o["error"]] = errors.get(o["error"], 0) + 1
    study = optuna.load_study(study_name=STUDY, storage=storage)
    stored_trials = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    mlc = MlflowClient(mlflow_uri)
    exp = mlc.get_experiment_by_name(experiment)
    stored_runs = len([r for r in mlc.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                                   max_results=5000) if r.info.status == "FINISHED"])
    by = {k: [o for o in ops if o["kind"] == k] for k in ("study", "mlflow")}
    st, ml = _stats(by["study"]), _stats(by["mlflow"])
    return {"writers": len(addresses), "rounds": rounds, "wall_seconds": round(wall, 1),
            "writers_hung": len(not_done), "study": st, "mlflow": ml, "errors": errors,
            "stored_complete_trials": stored_trials, "stored_finished_children": stored_runs,
            "lost_or_extra": f"study {stored_trials - st['ok']:+d}, MLflow {stored_runs - ml['ok']:+d}"}


def writers(client, services, workdir: Path, rounds: int, on_config=None) -> dict:
    out = {}
    sqlite_server = services.mlflow("sqlite", f"sqlite:///{workdir / 'mlflow-writers.db'}")
    configs = {
        "sqlite": (f"sqlite:///{workdir / 'writers-a.db'}", sqlite_server),
        "postgresql": (services.database("writers"), services.mlflow("writers", services.database("mlflow_writers"))),
        "sqlite-direct": (f"sqlite:///{workdir / 'writers-b.db'}", f"sqlite:///{workdir / 'mlflow-direct.db'}"),
    }
    for name, (study_url, mlflow_uri) in configs.items():
        out[name] = run_config(client, study_url, mlflow_uri, workdir, rounds)
        print(name, {k: out[name][k] for k in ("wall_seconds", "errors", "lost_or_extra")}, flush=True)
        if on_config is not None:  # saved as each backend is done
            on_config(name, out[name])
    return out
