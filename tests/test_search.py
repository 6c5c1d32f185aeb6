"""The outer loop's Optuna plumbing: seeded samplers, SQLite persistence, crash recovery."""

import socket

import optuna
import pytest
from optuna.trial import TrialState

from memcontrol import search as S

BLOCKS = tuple(f"down_blocks.{i}.attentions.0" for i in range(5))


def _study(tmp_path, sampler="nsga2", seed=0, name="s"):
    return S.open_study(tmp_path / "study.db", name, sampler=sampler, seed=seed, population_size=4,
                        directions=["minimize", "minimize"])


def _run(study, n, batch=2):
    space = S.search_space(len(BLOCKS), 1e-4, 1e-2)
    while (left := n - S.n_finished(study)) > 0:
        for t in S.ask_batch(study, space, min(batch, left)):
            m = S.mask_of(t.params, BLOCKS, method="lora", mode="full", granularity="transformer", options={})
            S.tell(study, t, [sum(m.bits) + m.lr, len(m.bits) - sum(m.bits)])


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_reproducible(tmp_path, sampler):
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        st = _study(tmp_path / str(i), sampler, seed)
        _run(st, 10)
        runs.append([t.params for t in st.trials])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_study_resumes_from_sqlite(tmp_path):
    st = _study(tmp_path)
    _run(st, 4)
    first = [t.params for t in st.trials]
    st2 = _study(tmp_path)  # a new process would do exactly this
    assert S.n_finished(st2) == 4
    _run(st2, 6)
    assert [t.params for t in st2.trials][:4] == first and S.n_finished(st2) == 6


def test_interrupted_trial_is_failed_and_retried(tmp_path):
    st = _study(tmp_path)
    space = S.search_space(len(BLOCKS), 1e-4, 1e-2)
    t = st.ask(space)
    t.set_user_attr("owner", f"{socket.gethostname()}:999999999")  # a worker that no longer exists
    live = st.ask(space)
    live.set_user_attr("owner", "another-host:1")  # someone else's: left alone
    redone = S.recover_interrupted(st)
    assert redone == [t.number]
    states = {x.number: x.state for x in st.trials}
    assert states[t.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    retry = st.ask(space)
    assert retry.params == t.params and retry.user_attrs["retry_of"] == t.number


def test_nan_is_failed_with_reason(tmp_path):
    st = _study(tmp_path)
    t = st.ask(S.search_space(len(BLOCKS), 1e-4, 1e-2))
    S.tell(st, t, [float("nan"), 1.0])
    ft = st.trials[t.number]
    assert ft.state == TrialState.FAIL and ft.user_attrs["fail_reason"] == "nan objective"


def test_other_sampler_settings_get_their_own_study(tmp_path):
    """A `dvc exp run -S search.sampler=...` searches anew in a sibling study of the same file; the
    original study, with its sampler, stays resumable."""
    first = _study(tmp_path, "nsga2")
    first.tell(first.ask(S.search_space(len(BLOCKS), 1e-4, 1e-2)), [0.5, 0.5])
    other = _study(tmp_path, "tpe")
    assert other.study_name == "s.tpe-seed0-pop4" and other.user_attrs["sampler"] == "tpe" and not other.trials
    assert _study(tmp_path, "tpe").study_name == "s.tpe-seed0-pop4"  # and resumes there
    again = _study(tmp_path, "nsga2")
    assert again.study_name == "s" and again.user_attrs["sampler"] == "nsga2" and len(again.trials) == 1
