"""search.workers > 1: each batch's trials run at once on Dask, through Prefect's DaskTaskRunner
(prefect-dask), one trial per Dask worker (docs/scale_out.md).

One trial per worker, one GPU per worker: every worker offers the Dask resource `trial: 1` and
every trial task asks for `trial: 1`, so Dask never starts a second trial on a worker that holds
one (whatever its thread count). The default cluster is a `distributed.LocalCluster` of
`search.workers` single-threaded processes on 127.0.0.1 (torch on one thread each);
`search.dask_address` connects to an existing scheduler instead, whose workers were started with
`--resources trial=1` (and CUDA_VISIBLE_DEVICES: one GPU each).

A worker that dies mid-trial is not retried by Dask (`allowed-failures: 0` for the LocalCluster's
scheduler; docs/scale_out.md sets it for a cluster of your own): its trial stays RUNNING in the
study until Optuna's heartbeat check fails it and enqueues it once more (memcontrol/study_storage.py),
so exactly one mechanism retries it. The task run is marked Crashed in Prefect."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import KilledWorker
from prefect.client.orchestration import get_client
from prefect.states import Crashed
from prefect_dask import DaskTaskRunner

from memcontrol import search as S
from memcontrol.config import Params, Search
from memcontrol.evaluate import objective_values
from memcontrol.workdir import Layout
from tasks import stages as T

log = logging.getLogger(__name__)

RESOURCE = {"trial": 1}  # what each worker offers and each trial asks for

# Dask's housekeeping, sized for many short tasks, costs a few % of a core in every process (a
# 20 ms event-loop tick, a 10 ms stack profiler, a 0.5 s system monitor). A worker here holds one
# trial of minutes: on a machine whose cores the trials fill, that time comes out of the trials.
# An idle 2-worker cluster used 6.6 % of a core with Dask's defaults and 2.7 % with these
# (benchmarks/scale_out.py, `idle_cluster_cpu`). The price: no profile in Dask's dashboard.
QUIET = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def _api_url() -> str | None:
    """The Prefect API this flow reports to (the ephemeral server's too), for the workers' tasks."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def worker_environ() -> dict:
    """What Dask's nanny puts in a worker's environment before it starts (its
    `distributed.nanny.pre-spawn-environ`), less MALLOC_TRIM_THRESHOLD_. Dask sets that to 64 KiB so
    idle workers hand memory back to the OS; set at all, it also stops glibc from raising its mmap
    threshold, so every large tensor of a training step is mmapped and unmapped anew: a trial ran
    about 1.5x slower with it (benchmarks/worker_malloc.py, docs/scale_out.md "Measured")."""
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


@contextmanager
def trial_runner(search: Search) -> Iterator[DaskTaskRunner]:
    """A started DaskTaskRunner: on the scheduler at `search.dask_address`, or on a LocalCluster of
    `search.workers` processes with one thread and the `trial` resource each (environment:
    `worker_environ`)."""
    with dask.config.set({**QUIET, "distributed.scheduler.allowed-failures": 0,
                          "distributed.nanny.pre-spawn-environ": worker_environ()}):
        if search.dask_address:
            runner = DaskTaskRunner(address=search.dask_address)
        else:
            # a worker inherits this process's environment, where a nanny of an earlier cluster (it
            # writes its pre-spawn environ here) or the shell may have put the threshold
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFECT_API_URL": _api_url() or ""}
            runner = DaskTaskRunner(cluster_kwargs={
                "n_workers": search.workers, "threads_per_worker": 1, "processes": True, "resources": RESOURCE,
                "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "env": env,
                "preload": ["tasks.stages"],  # torch, diffusers and the trial code imported as the worker starts
            })
        quiet = logging.getLogger("distributed")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # not every worker start and stop
        try:
            with runner:
                log.info("trials run on Dask: %s", runner.client)
                yield runner
        finally:
            quiet.setLevel(level)


def evaluate(runner: DaskTaskRunner, params: Params, workdir: str, study_url: str, batch,
             logged: Callable[[object, dict, str], object]) -> list[S.Outcome]:
    """Submit every trial of `batch` at once, then collect them in order: a result is an Outcome
    (and an MLflow child via `logged`), an error a failed trial, a killed worker a lost one."""
    layout = Layout(Path(workdir))
    futures = []
    with dask.annotate(resources=RESOURCE):
        for trial, mask in batch:
            out = layout.trials / mask.digest()
            trial.set_user_attr("trial_dir", str(out.relative_to(layout.root)))
            task = T.run_trial.with_options(task_run_name=f"trial-{trial.number:03d}")
            futures.append((out, runner.submit(task, parameters={
                "params": params, "root": workdir, "mask_json": mask.to_json(), "out_dir": str(out),
                "study_url": study_url, "trial_id": trial._trial_id})))
    outcomes = []
    for (trial, _), (out, future) in zip(batch, futures):
        try:
            rec = future.result()
        except KilledWorker as e:
            _crashed(future.task_run_id, f"its Dask worker died: {e}")
            outcomes.append(S.Outcome(None, reason=f"KilledWorker: {e}", lost=True))
            continue
        except Exception as e:  # one broken candidate must not end the study
            log.exception("trial %d failed", trial.number)
            outcomes.append(S.Outcome(None, reason=f"{type(e).__name__}: {e}"))
            continue
        outcomes.append(S.Outcome(objective_values(params, rec["metrics"]), rec))
        logged(trial, rec, str(out))
    return outcomes


def _crashed(task_run_id, message: str) -> None:
    """The task run of a killed worker stays Running in Prefect (no one is left to report): say Crashed."""
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception:  # the UI's state is a courtesy; the study is what counts
        log.warning("could not mark task run %s Crashed in Prefect", task_run_id, exc_info=True)
