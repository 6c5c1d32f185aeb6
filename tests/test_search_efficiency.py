"""Issue 14: batch proposals that do not collide, early stopping at rungs (multi-fidelity), and the
method searched with the mask. Stand-in evaluations for the loop's plumbing; one real micro search
(Prefect flow, MLflow SQLite, real training) for early stopping and the method list together."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from memcontrol import fidelity as F
from memcontrol import search as S
from memcontrol.config import ConfigError, load_params
from memcontrol.method_choice import check_methods, options_for
from memcontrol.tuning import Mask, MaskError

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = tuple(f"down_blocks.{i}.attentions.0" for i in range(3))
MIN2 = ["minimize", "minimize"]


def _make(params):
    return S.mask_of(params, BLOCKS[: sum(k.startswith("b") for k in params)], method="lora", mode="full",
                     granularity="transformer", options={})


def _study(tmp_path, sampler, population_size=2):
    return S.open_study(tmp_path / "study.db", "s", sampler=sampler, seed=0, population_size=population_size,
                        directions=MIN2)


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_a_batch_holds_distinct_unscored_proposals(tmp_path, sampler):
    """Three bits, one LR: 8 configurations, so every sampler proposes repeats. Each batch handed to
    the evaluation is full (batch_size distinct configurations, none scored before) until the space
    runs out, and the search ends there instead of asking forever."""
    st = _study(tmp_path, sampler)
    batches = []

    def evaluate(proposals):
        batches.append([m.digest() for _, m in proposals])
        return [S.Outcome([sum(m.bits), 3 - sum(m.bits) + m.bits[0] * 0.5], {}) for _, m in proposals]

    S.optimize(st, S.search_space(3, (1e-3,)), n_trials=10, batch_size=3, make_mask=_make, evaluate=evaluate, seed=0)
    flat = [d for b in batches for d in b]
    assert len(flat) == len(set(flat)) == 8 == S.n_finished(st)
    assert [len(b) for b in batches] == [3, 3, 2]


@pytest.mark.parametrize("sampler", ["gp", "nsga2"])
def test_a_configuration_that_failed_is_not_evaluated_again(tmp_path, sampler):
    """The empty mask trains nothing and fails; GPSampler ignores failed trials and would propose it
    until the failure cap. A repeat of a failed configuration fails at once, without an evaluation
    and without counting towards max_failures, so the search still ends with n_trials scored."""
    st = _study(tmp_path, sampler)
    evaluated = []

    def evaluate(proposals):
        evaluated.extend(m.digest() for _, m in proposals)
        return [S.Outcome([sum(m.bits), 3 - sum(m.bits)], {}) if any(m.bits) else
                S.Outcome(None, reason="no trainable parameters") for _, m in proposals]

    S.optimize(st, S.search_space(3, (1e-3,)), n_trials=7, batch_size=2, make_mask=_make, evaluate=evaluate, seed=0,
               max_failures=2)
    assert len(evaluated) == len(set(evaluated)) == 8 and S.n_finished(st) == 7
    repeats = [t for t in st.trials if t.state == TrialState.FAIL and "duplicate_of" in t.user_attrs]
    assert all("failed in trial" in t.user_attrs["fail_reason"] for t in repeats)


def test_stopped_trials_are_pruned_with_partial_values_count_against_the_budget_and_are_not_retrained(tmp_path):
    st = _study(tmp_path, "nsga2")
    trained = []

    def evaluate(proposals):
        trained.extend(m.digest() for _, m in proposals)
        return [S.Outcome([9.0, 9.0], {"m": 1}, stopped_at=2) if m.bits[0] else S.Outcome([sum(m.bits), 1.0], {})
                for _, m in proposals]

    S.optimize(st, S.search_space(2, (1e-3,)), n_trials=4, batch_size=3, make_mask=_make, evaluate=evaluate, seed=0)
    assert len(trained) == len(set(trained)) == 4 == S.n_finished(st)
    stopped = S.stopped(st)
    assert len(stopped) == 2 and all(t.state == TrialState.PRUNED for t in stopped)
    assert all(t.user_attrs["stopped_at"] == 2 and t.user_attrs["partial_values"] == [9.0, 9.0] for t in stopped)
    # a repeat of a stopped configuration is answered as stopped, without training
    again = st.ask(S.search_space(2, (1e-3,)))
    S.answer_duplicate(st, again, stopped[0])
    frozen = st.trials[again.number]
    assert frozen.state == TrialState.PRUNED and frozen.user_attrs["stopped_at"] == 2
    assert frozen.user_attrs["duplicate_of"] == stopped[0].number and len(S.stopped(st)) == 2


def test_the_stopping_rule_is_domination_at_the_same_rung():
    assert F.rung_steps(160, (0.25, 0.5)) == (40, 80) and F.rung_steps(4, (0.25, 0.5)) == (1, 2)
    assert F.rung_steps(1, (0.5,)) == ()
    earlier = np.array([[1.0, 1.0], [0.5, 3.0]])
    assert F.dominated([2.0, 2.0], earlier, MIN2, min_points=2)
    assert not F.dominated([0.8, 1.5], earlier, MIN2, min_points=2)  # a new trade-off survives
    assert not F.dominated([2.0, 2.0], earlier, MIN2, min_points=3)  # too few points at the rung yet
    st = optuna.create_study(directions=MIN2)
    first, second = st.ask(), st.ask()
    on_first = F.stopper(st, first, MIN2, min_points=1, values_of=lambda m: [m["a"], m["b"]])
    on_second = F.stopper(st, second, MIN2, min_points=1, values_of=lambda m: [m["a"], m["b"]])
    assert not on_first(5, {"a": 1.0, "b": 1.0})  # nothing to compare with: it goes on
    assert on_second(5, {"a": 2.0, "b": 2.0})  # dominated by the running first trial's point
    assert not on_second(7, {"a": 0.0, "b": 0.0})  # another rung: nobody there yet
    assert st.trials[second.number].user_attrs["rungs"] == {"5": [2.0, 2.0], "7": [0.0, 0.0]}


def test_a_method_list_puts_the_method_in_the_space_and_gives_each_method_its_own_options(tmp_path):
    space = S.search_space(2, (1e-3,), ("lora", "svdiff"))
    assert space["method"].choices == ("lora", "svdiff")
    assert S.unmasked_params(2, (1e-3,), ("lora", "svdiff"))["method"] == "lora"
    mask = _make({"b00": 1, "b01": 0, "lr": 1e-3, "method": "svdiff"})
    assert mask.method == "svdiff" and "method" not in S.search_space(2, (1e-3,), ("lora",))
    assert options_for("svdiff", {"rank": 2}, ("lora", "svdiff")) == {}
    assert options_for("lora", {"rank": 2}, ("lora", "svdiff")) == {"rank": 2}
    with pytest.raises(MaskError, match=r"\['rank'\] belong to none"):
        check_methods(("svdiff", "difffit"), {"rank": 2}, {"svdiff": BLOCKS, "difffit": BLOCKS})
    with pytest.raises(MaskError, match="different block layouts"):
        check_methods(("svdiff", "lora"), {}, {"svdiff": BLOCKS, "lora": BLOCKS[:2]})
    with pytest.raises(MaskError, match="unknown"):
        check_methods(("lora", "nope"), {}, {})
    bad = tmp_path / "params.yaml"
    bad.write_text("tuning: {method: [lora, lora]}\n")
    with pytest.raises(ConfigError, match="tuning.method"):
        load_params(bad)


# -- one real micro search: early stopping + the method list ------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows import pipeline

    root = tmp_path_factory.mktemp("efficiency")
    params = yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text())
    params["tuning"] = {"method": ["lora", "svdiff", "difffit"], "mode": "full", "options": {"rank": 2}}
    # one LR: the 3 anchors (each method with no mask) leave 3 proposals that may be stopped
    # early stopping compares rung points on plain KID (a relative objective would need the anchors' rungs)
    params["search"].update({"n_trials": 6, "batch_size": 2, "sampler": "random", "learning_rates": [1.0e-3],
                             "objectives": ["mem_mean_sim", "kid"],
                             "early_stopping": {"enabled": True, "rungs": [0.5], "min_trials": 1}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args = (str(root / "params.yaml"), str(root))
    with prefect_test_harness(server_startup_timeout=90), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / ".prefect-storage"}):
        for stage in (pipeline.prepare, pipeline.base, pipeline.reference, pipeline.search):
            stage(*args)
    study = optuna.load_study(study_name="memcontrol", storage=f"sqlite:///{root / 'search' / 'study.db'}")
    return root, study


def test_early_stopped_trials_are_recorded_in_optuna_trials_csv_and_mlflow(searched):
    root, study = searched
    stopped = S.stopped(study)
    assert stopped, "no trial was stopped (the rule stops one dominated at step 2 by an earlier point)"
    for t in stopped:
        assert t.state == TrialState.PRUNED and t.user_attrs["stopped_at"] == 2
        assert t.user_attrs["partial_values"] == t.user_attrs["rungs"]["2"]
    for t in S.completed(study):  # every trial that went on was scored at the rung first
        assert set(t.user_attrs["rungs"]) == {"2"} and len(t.values) == 2
    assert S.n_finished(study) == 6
    table = pd.read_csv(root / "search" / "trials.csv")
    rows = table[table["stopped_at"].notna()]
    assert sorted(rows["number"]) == sorted(t.number for t in stopped) and not rows["pareto"].any()
    assert rows["mem_mean_sim"].tolist() == [t.user_attrs["partial_values"][0] for t in sorted(stopped, key=lambda t: t.number)]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("memcontrol").experiment_id],
                              f"tags.memcontrol_child = 'trial-{stopped[0].number:03d}'")
    assert runs and runs[0].data.metrics["stopped_at_step"] == 2


def test_the_search_chooses_the_method_and_the_mask_json_and_audit_carry_it(searched):
    from memcontrol.audit.arms import arm_mask
    from memcontrol.workdir import Layout

    root, study = searched
    params = load_params(root / "params.yaml")
    for t in S.completed(study) + S.stopped(study):
        mask = json.loads(t.user_attrs["record"])["mask"]
        assert mask["method"] == t.params["method"] in ("lora", "svdiff", "difffit")
        assert mask["options"] == ({"rank": 2} if mask["method"] == "lora" else {})
    assert len({t.params["method"] for t in study.trials}) > 1
    selected = Mask.load(root / "masks" / "selected.json")
    info = json.loads((root / "masks" / "selected_info.json").read_text())
    assert selected.method == study.trials[info["trial"]].params["method"]
    unmasked = arm_mask(params, Layout(root), "unmasked", selected)
    assert unmasked.method == selected.method and unmasked.blocks == ()
    assert dict(unmasked.options) == dict(selected.options)
    assert "method" in pd.read_csv(root / "search" / "trials.csv").columns


def test_scoring_at_rungs_leaves_the_final_result_unchanged(searched, tmp_path):
    """The rung evaluations draw nothing from the training's random stream: the same arm with and
    without rungs ends with the same metrics (so the exhaustive table's finals are plain trials)."""
    from memcontrol.arms import run_arm, search_rows
    from memcontrol.evaluate import EvalContext
    from memcontrol.workdir import Layout

    root, _ = searched
    params = load_params(root / "params.yaml")
    layout = Layout(root)
    ctx = EvalContext(params, layout, "val")
    rows = search_rows(params, ctx)
    mask = Mask.load(root / "masks" / "selected.json")
    plain = run_arm(params, layout, ctx, mask, tmp_path / "plain", rows=rows, steps=4, seed=3)
    staged = run_arm(params, layout, ctx, mask, tmp_path / "rungs", rows=rows, steps=4, seed=3, rungs=(1, 2))
    assert set(staged["rungs"]) == {"1", "2"} and staged["stopped_at"] is None
    for key in ("mem.mean_sim", "quality.kid_mean", "final_loss"):
        assert staged["metrics"][key] == plain["metrics"][key]
    assert staged["rungs"]["1"]["mem.mean_sim"] != plain["metrics"]["mem.mean_sim"]
