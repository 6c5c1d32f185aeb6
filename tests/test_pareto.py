import numpy as np
import optuna
import pandas as pd
import pytest

from memcontrol.pareto import is_pareto_front, select


def test_front_matches_optuna_best_trials():
    rng = np.random.default_rng(0)
    values = rng.random((60, 2))
    values[5] = values[7]  # a tie: both kept
    study = optuna.create_study(directions=["minimize", "minimize"])
    for v in values:
        t = study.ask()
        study.tell(t, v.tolist())
    ours = set(np.flatnonzero(is_pareto_front(values, ["minimize", "minimize"])))
    assert ours == {t.number for t in study.best_trials}


def test_maximize_direction_and_nan():
    v = np.array([[1.0, 1.0], [2.0, 2.0], [np.nan, 5.0]])
    assert is_pareto_front(v, ["minimize", "maximize"]).tolist() == [True, True, False]


def test_selection_rules():
    front = pd.DataFrame({"mem": [0.9, 0.5, 0.2], "kid": [0.10, 0.12, 0.30]})
    rule = "least_memorization_within_quality"
    # the limit is relative to the reference arm's quality (full fine-tuning's KID 0.10), not the front's best
    pick, why = select(front, mem="mem", quality="kid", rule=rule, quality_tolerance=0.5, reference_quality=0.10)
    assert pick["mem"] == 0.5 and why["quality_limit"] == pytest.approx(0.15) and why["n_within"] == 2
    pick, _ = select(front, mem="mem", quality="kid", rule=rule, quality_tolerance=0.2, reference_quality=0.25)
    assert pick["mem"] == 0.2  # 0.30 <= 0.25 * 1.2
    pick, why = select(front, mem="mem", quality="kid", rule=rule, quality_tolerance=0.2, reference_quality=0.05)
    assert pick["mem"] == 0.9 and "fallback" in why  # nothing within 0.06: the best-quality point
    assert select(front, mem="mem", quality="kid", rule="best_quality", quality_tolerance=0)[0]["mem"] == 0.9
    with pytest.raises(ValueError, match="needs the reference"):
        select(front, mem="mem", quality="kid", rule=rule, quality_tolerance=0.2)
    with pytest.raises(ValueError):
        select(front.iloc[:0], mem="mem", quality="kid", rule="knee", quality_tolerance=0)


def test_each_point_is_measured_against_its_own_anchor():
    """A low-LR mask learns less after the inner loop whatever its mask: measured against the method
    with no mask at its own LR it qualifies, where one reference for all would exclude it."""
    from memcontrol.config import Params
    from memcontrol.selection import reference_quality
    trials = pd.DataFrame({"number": [0, 1, 2, 3], "method": ["full"] * 4, "lr": [1e-4, 1e-3, 1e-4, 1e-3],
                           "bits": ["111", "111", "101", "110"], "mem_mean_sim": [0.70, 0.84, 0.65, 0.80],
                           "kid": [0.112, 0.060, 0.123, 0.034]})
    params = Params.model_validate({"search": {"objectives": ["mem_mean_sim", "kid"]}})
    ref = reference_quality(params, trials, trials)
    assert ref.tolist() == [0.112, 0.060, 0.112, 0.060]
    pick, why = select(trials, mem="mem_mean_sim", quality="kid", rule="least_memorization_within_quality",
                       quality_tolerance=0.2, reference_quality=ref)
    assert pick["number"] == 2 and why["n_within"] == 4 and why["reference_quality"] == [0.06, 0.112]
    pick, _ = select(trials, mem="mem_mean_sim", quality="kid", rule="least_memorization_within_quality",
                     quality_tolerance=0.2, reference_quality=0.060)  # one reference: the low-LR masks are out
    assert pick["number"] == 3
    with pytest.raises(Exception, match="no anchor trial .* lr 0.0003"):
        reference_quality(params, trials, trials.assign(lr=[1e-4, 1e-3, 3e-4, 1e-3]))
