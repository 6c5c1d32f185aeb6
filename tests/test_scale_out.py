"""Issue 13: trials in parallel on Dask against a shared PostgreSQL study, and a worker killed
mid-trial. Real components throughout: the `memcontrol search` CLI and Prefect flow, a Dask
LocalCluster of 2 worker processes (prefect-dask's DaskTaskRunner), PostgreSQL from
scripts/postgres.sh (the `postgres` fixture), MLflow on SQLite, the micro configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image
from safetensors import safe_open

from memcontrol import study_storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A micro workdir after prepare, base and reference (the search's inputs)."""
    from micro_workdir import prepared as prepare_workdir

    return prepare_workdir(tmp_path_factory.mktemp("prepared"))


def _workdir(prepared: Path, dest: Path, **search) -> Path:
    shutil.copytree(prepared, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["search"].update(search)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def _search(work: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(work / ".prefect" / "s"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "search", "-p", str(work / "params.yaml"), "--root",
                             str(work)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    return out


def _scored(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs]


def _check_outputs(work: Path, study: optuna.Study) -> None:
    """One MLflow child per scored trial, and under search/trials/ exactly the scored trials'
    folders, every file in them complete (JSON parses, safetensors and PNG load)."""
    scored = _scored(study)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memcontrol")
    parent = client.search_runs([exp.experiment_id], f"tags.memcontrol_kind = 'study' and tags.memcontrol_name = '{study.study_name}'")
    assert len(parent) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    names = sorted(r.info.run_name for r in children if r.info.run_name.startswith("trial-"))
    assert names == sorted(f"trial-{t.number:03d}" for t in scored)
    trials = work / "search" / "trials"
    assert sorted(p.name for p in trials.iterdir() if not p.name.startswith(".")) == sorted(
        Path(t.user_attrs["trial_dir"]).name for t in scored)
    for folder in (p for p in trials.iterdir() if not p.name.startswith(".")):
        assert {"metrics.json", "mask.json", "adapter.safetensors", "grid.png"} <= {f.name for f in folder.iterdir()}
        for f in folder.iterdir():
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(f, "pt") as tensors:
                    assert list(tensors.keys())
            elif f.suffix == ".png":
                Image.open(f).verify()


def _worker_pid(search: subprocess.Popen, address: str) -> int:
    """The Dask worker process (a child of the search) listening at `address` (tcp://host:port)."""
    port = int(address.rsplit(":", 1)[1])
    for child in psutil.Process(search.pid).children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of the search listens at {address}")


@pytest.fixture(scope="module")
def killed_search(prepared, postgres, tmp_path_factory):
    """One micro search with search.workers: 2 (a LocalCluster of 2 worker processes) on the
    PostgreSQL study, 3 trials in batches of 2; as soon as a worker has started a trial, that worker
    process is SIGKILLed. Returns (workdir, study, the killed trial, the search's output). One search
    for both tests below: each search starts a Prefect server and two workers (the test budget)."""
    work = _workdir(prepared, tmp_path_factory.mktemp("killed") / "w", workers=2, batch_size=2, n_trials=3,
                    storage=postgres, study_name="killed", heartbeat_interval=1, grace_period=3)
    search = _search(work)
    victim, deadline = None, time.monotonic() + 600
    while victim is None and search.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            running = optuna.load_study(study_name="killed", storage=postgres).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        victim = next((t for t in running if "worker" in t.user_attrs), None)  # a worker has started it
    assert victim is not None, "no trial reached a worker"
    pid = _worker_pid(search, victim.user_attrs["worker"])
    environ = psutil.Process(pid).environ()
    os.kill(pid, signal.SIGKILL)
    out = _finish(search)
    return work, optuna.load_study(study_name="killed", storage=postgres), victim, out, environ


def test_two_workers_on_dask_and_postgresql(killed_search):
    """The batch's 2 trials ran at once, one on each Dask worker, in the PostgreSQL study; the flow's
    outputs are those of a one-worker search (one MLflow child per trial, trials.csv, trial folders)."""
    work, study, _, out, _ = killed_search
    first_batch = [t for t in study.trials if t.number in (0, 1)]
    assert len({t.user_attrs["worker"] for t in first_batch}) == 2, out[-4000:]
    assert len((work / "search" / "trials.csv").read_text().strip().splitlines()) == 1 + 3
    _check_outputs(work, study)


def test_a_trial_worker_runs_single_threaded_without_dasks_malloc_trim_threshold(killed_search):
    """The worker process's environment (read from the live process): torch and BLAS on one thread,
    and no MALLOC_TRIM_THRESHOLD_, which Dask sets by default and which made a trial 1.5x slower
    (flows/parallel.worker_environ)."""
    environ = killed_search[4]
    assert environ.get("OMP_NUM_THREADS") == "1" and environ.get("MKL_NUM_THREADS") == "1"
    assert "MALLOC_TRIM_THRESHOLD_" not in environ


def test_a_worker_killed_mid_trial_is_retried_once_by_the_heartbeat(killed_search):
    """The SIGKILLed worker's trial: Optuna's heartbeat found it stale, failed it and enqueued it once
    with the same parameters; the study ends with exactly n_trials scored, none twice, none left
    running, one MLflow child each and nothing half-written under search/trials/."""
    work, study, victim, out, _ = killed_search
    scored = _scored(study)
    assert len(scored) == 3, out[-4000:]
    assert study.trials[victim.number].state == TrialState.FAIL
    retries = [t for t in study.trials if study_storage.retried_from(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == victim.params
    assert len({t.user_attrs["mask_digest"] for t in scored}) == 3  # no configuration scored twice
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    _check_outputs(work, study)


def test_postgresql_study_keeps_the_resume_guards(postgres):
    """The study in PostgreSQL as in SQLite: a resume under the same settings continues it, one under
    another setting is refused naming the key and both values (memcontrol.resume.check_resume)."""
    from memcontrol import search as S
    from memcontrol.config import Params

    params = Params()
    blocks = ("down_blocks.0.attentions.0", "mid_block.attentions.0")

    def resume(p):
        return S.open_study(postgres, "resume-guard", sampler="nsga2", seed=0, population_size=4,
                            directions=["minimize", "minimize"], settings=S.resume_settings(p, blocks))

    study = resume(params)
    study.tell(study.ask(S.search_space(len(blocks), params.search.learning_rates)), [0.5, 0.5])
    assert len(resume(params).trials) == 1
    other = params.model_copy(update={"train": params.train.model_copy(update={"steps": 7})})
    with pytest.raises(S.ResumeError, match=rf"train\.steps={params.train.steps}\b.*train\.steps=7\b") as err:
        resume(other)
    assert "postgresql+psycopg://" in str(err.value)


def test_the_dask_config_for_a_cluster_of_your_own_unsets_the_malloc_trim_threshold():
    """docs/scale_out.md step 4: `DASK_CONFIG=scripts/dask dask worker ...` starts workers without
    Dask's MALLOC_TRIM_THRESHOLD_ (read as a nanny reads it, in a fresh process), and with the
    quiet housekeeping that the LocalCluster of search.workers gets (flows/parallel.QUIET)."""
    from flows.parallel import QUIET

    code = ("from distributed.nanny import _get_env_variables; import json, dask; "
            f"print(json.dumps({{k: dask.config.get(k) for k in {sorted(QUIET)!r}}})); "
            "print(json.dumps(_get_env_variables('distributed.nanny.pre-spawn-environ')))")
    env = {**os.environ, "DASK_CONFIG": str(ROOT / "scripts" / "dask")}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    environ = json.loads(out.strip().splitlines()[-1])
    assert "MALLOC_TRIM_THRESHOLD_" not in environ and environ.get("OMP_NUM_THREADS") == "1"
    assert json.loads(out.strip().splitlines()[-2]) == QUIET
    default = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in env.items() if k != "DASK_CONFIG"},
                             capture_output=True, text=True, check=True).stdout
    assert "MALLOC_TRIM_THRESHOLD_" in json.loads(default.strip().splitlines()[-1])  # what it undoes
