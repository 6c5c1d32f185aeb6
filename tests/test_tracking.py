"""Issue 12 item 4: an MLflow rerun with changed settings or metrics records them. A child run is
keyed by its name and its record's key (code, params, inputs): the same result logged again is
not duplicated; a changed one gets a new child run, and the earlier one is marked superseded."""

from __future__ import annotations

import os
import signal
import sqlite3

from mlflow.tracking import MlflowClient

from memcontrol import atomic
from tasks import tracking

MASK = {"method": "lora", "mode": "full", "lr": 1e-3, "blocks": ["a", "b"], "bits": [1, 0]}


def _record(key: str, kid: float) -> dict:
    return {"key": {"params": key}, "mask": MASK, "metrics": {"quality.kid_mean": kid, "mem.mean_sim": 0.5}}


def test_a_rerun_with_changed_settings_makes_a_new_child_and_marks_the_old_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 3})
    first = tracking.log_child(uri, "e", tmp_path, parent, name="trial-000", record=_record("a", 0.2))
    assert tracking.log_child(uri, "e", tmp_path, parent, name="trial-000", record=_record("a", 0.2)) == first
    second = tracking.log_child(uri, "e", tmp_path, parent, name="trial-000", record=_record("b", 0.1))
    assert second != first
    client = MlflowClient(uri)
    old, new = client.get_run(first), client.get_run(second)
    assert new.data.metrics["quality.kid_mean"] == 0.1 and old.data.metrics["quality.kid_mean"] == 0.2
    assert new.data.tags["memcontrol_current"] == "true" and new.data.tags["memcontrol_rerun_of"] == first
    assert old.data.tags["memcontrol_current"] == "false" and old.data.tags["memcontrol_superseded_by"] == second
    exp = client.get_experiment_by_name("e")
    current = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                                      "tags.memcontrol_current = 'true'")
    assert [r.info.run_id for r in current] == [second]


def test_a_result_logged_under_an_interrupted_trials_number_takes_the_new_number(tmp_path):
    """A kill after a trial's run was logged but before Optuna was told: the rerun fails that trial
    and asks its configuration again under a new number; the same result is one run, renamed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={})
    first = tracking.log_child(uri, "e", tmp_path, parent, name="trial-000", record=_record("a", 0.2))
    assert tracking.log_child(uri, "e", tmp_path, parent, name="trial-002", record=_record("a", 0.2)) == first
    client = MlflowClient(uri)
    run = client.get_run(first)
    assert run.info.run_name == "trial-002" and run.data.tags["memcontrol_child"] == "trial-002"
    assert run.data.tags["memcontrol_logged_as"] == "trial-000"
    exp = client.get_experiment_by_name("e")
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 1


def test_a_resumed_parent_records_changed_params_as_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 3, "seed": 0})
    assert tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 8, "seed": 0}) == parent
    run = MlflowClient(uri).get_run(parent)
    assert run.data.params["n_trials"] == "3" and run.data.tags["rerun.n_trials"] == "8" and "rerun.seed" not in run.data.tags


def _revision(db) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("select version_num from alembic_version").fetchone()[0]


def test_a_kill_while_mlflow_creates_its_store_leaves_no_half_store(tmp_path):
    """Issue 12 item 8: SIGKILL in the middle of MLflow's migrations of a fresh store (here: at the
    first migration step) leaves no mlflow.db, only a temp file the next run removes; the rerun
    builds the store and logs (before the fix it hung or failed at 'Updating database tables')."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pid = os.fork()
    if pid == 0:
        try:
            import mlflow.store.db.utils as db_utils

            def die(engine):
                os.kill(os.getpid(), signal.SIGKILL)
            db_utils._upgrade_db = die  # tables created, migrations not yet run: then the kill
            tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={})
        finally:
            os._exit(0)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not (tmp_path / "mlflow.db").exists() and atomic.leftovers(tmp_path)
    assert atomic.clean_leftovers(tmp_path) and atomic.leftovers(tmp_path) == []
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 3})
    assert MlflowClient(uri).get_run(parent).data.params == {"n_trials": "3"}


def test_a_half_migrated_store_without_runs_is_rebuilt(tmp_path, caplog):
    """A store left half-migrated by an older version (schema behind MLflow's head, no runs) is
    rebuilt whole instead of migrated from the middle."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    db = tmp_path / "mlflow.db"
    tracking.ensure_store(f"sqlite:///{db}", tmp_path)
    head = _revision(db)
    assert head == _get_latest_schema_revision()
    with sqlite3.connect(db) as con:  # as a kill after the early migrations leaves it
        con.execute("update alembic_version set version_num = 'bf29a5ff90ea'")
    uri = f"sqlite:///{tmp_path}/./mlflow.db"  # the same file, not yet checked by this process
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={})
    assert _revision(db) == head and MlflowClient(uri).get_run(parent).info.run_name == "study:s"
    assert "half-created MLflow store" in caplog.text
