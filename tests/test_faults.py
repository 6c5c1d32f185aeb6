"""Issue 12 item 8, the short version of benchmarks/faults.py: `memcontrol search` on the micro
configuration is SIGKILLed (its whole process group) at two chosen moments, while MLflow creates its
SQLite store and after the second trial's record is written, and rerun to the end. The result must
be the uninterrupted run's (the `micro_searched` fixture): the mask, trials.csv (clock columns
and Optuna's trial number dropped, nothing else) and the number of current MLflow runs; no output under its real name is half-written, no
temp file of a killed writer is left after the rerun, and no finished record is trained again."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from memcontrol import atomic
from micro_workdir import ROOT, cli, cli_args, cli_env, without_timing


def _kill_when(work: Path, ready, timeout: float = 3600) -> str:
    """Start `memcontrol search` on `work`; SIGKILL its process group once `ready(output_so_far)`."""
    log = work / f"search-{time.time_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cli_args(work, "search"), cwd=ROOT, env=cli_env(work), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready(log.read_text()):
            assert proc.poll() is None, f"search ended ({proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def _scored(work: Path) -> str:
    return pd.read_csv(io.StringIO(without_timing(work / "search" / "trials.csv"))).drop(columns="number").to_csv()


def _differences(got: str, want: str) -> list:
    a, b = pd.read_csv(io.StringIO(got), dtype=str), pd.read_csv(io.StringIO(want), dtype=str)
    if a.shape != b.shape or list(a.columns) != list(b.columns):
        return [a.shape, b.shape, list(a.columns), list(b.columns)]
    return [(i, c, a.at[i, c], b.at[i, c]) for i in a.index for c in a.columns if a.at[i, c] != b.at[i, c]]


def _records(work: Path) -> dict[str, int]:
    return {str(f.relative_to(work)): f.stat().st_ino for f in (work / "search").rglob("metrics.json")}


def _current_runs(work: Path) -> int:
    with sqlite3.connect(work / "mlflow.db") as db:
        total = db.execute("select count(*) from runs where lifecycle_stage = 'active'").fetchone()[0]
        stale = db.execute("select count(*) from tags where key = 'memcontrol_current' and value = 'false'").fetchone()[0]
    return total - stale


def _half_written(work: Path) -> list[str]:
    bad = []
    for f in work.rglob("*"):
        if f.is_file() and atomic.TEMP_MARK not in f.name and ".prefect" not in f.parts and f.suffix in (".json", ".csv"):
            try:
                json.loads(f.read_text()) if f.suffix == ".json" else pd.read_csv(f)
            except Exception:
                bad.append(str(f.relative_to(work)))
    return bad


def test_killed_twice_the_search_ends_as_the_uninterrupted_one(micro_searched, tmp_path):
    prepared, reference, _ = micro_searched
    work = tmp_path / "killed"
    shutil.copytree(prepared, work)

    # 1. while MLflow creates its tables and migrates them (before the fix: the rerun hung there)
    _kill_when(work, lambda out: "Creating initial MLflow database tables" in out)
    assert not (work / "mlflow.db").exists()  # the store is built under a temp name: none, or whole
    assert any(".mlflow" in p.name for p in atomic.leftovers(work))

    # 2. mid-search, once two trial records exist (the calibration arm's and the first trial's)
    second = _kill_when(work, lambda _: len(_records(work)) >= 2)
    assert "left by a killed writer" in second  # the first kill's temp store, removed at the start
    at_kill = _records(work)
    assert _half_written(work) == []

    run = cli(work, "search")
    assert run.returncode == 0, run.stderr[-4000:]
    assert atomic.leftovers(work) == [] and _half_written(work) == []
    after = _records(work)
    assert [k for k, ino in at_kill.items() if after.get(k) != ino] == []  # nothing finished was trained again
    # the same trials, in the same order, with the same values (memcontrol/resume.py); Optuna's
    # `number` differs (the trial a kill interrupted keeps its number, failed, and its retry comes after)
    got, want = _scored(work), _scored(reference)
    assert got == want, _differences(got, want)
    assert (work / "masks" / "selected.json").read_bytes() == (reference / "masks" / "selected.json").read_bytes()
    assert _current_runs(work) == _current_runs(reference)

    # issue 15 item 3: each trial's run holds the nearest-neighbour grid and the held-out sample grid
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memcontrol")
    trials = client.search_runs([exp.experiment_id], "tags.memcontrol_child LIKE 'trial-%'")
    assert len(trials) == 3
    for trial in trials:
        files = {a.path for a in client.list_artifacts(trial.info.run_id)}
        images = " ".join(a.path for a in client.list_artifacts(trial.info.run_id, "images"))
        assert {"grid.png", "samples.png"} <= files, files
        assert "samples_over_nearest" in images and "heldout_samples" in images
