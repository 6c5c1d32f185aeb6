"""Issue 12 item 4: an MLflow rerun with changed settings or metrics records them. A child run is
keyed by its name and its record's key (code, params, inputs): the same result logged again is
not duplicated; a changed one gets a new child run, and the earlier one is marked superseded."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

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


def test_a_resumed_parent_records_changed_params_as_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 3, "seed": 0})
    assert tracking.parent_run(uri, "e", tmp_path, kind="study", name="s", params={"n_trials": 8, "seed": 0}) == parent
    run = MlflowClient(uri).get_run(parent)
    assert run.data.params["n_trials"] == "3" and run.data.tags["rerun.n_trials"] == "8" and "rerun.seed" not in run.data.tags
