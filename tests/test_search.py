"""The outer loop's Optuna plumbing: seeded samplers, SQLite persistence, crash recovery, and
configurations never scored twice."""

import socket

import optuna
import pytest
from optuna.trial import TrialState

from memcontrol import anchors, search as S

BLOCKS = tuple(f"down_blocks.{i}.attentions.0" for i in range(5))


def _study(tmp_path, sampler="nsga2", seed=0, name="s"):
    return S.open_study(tmp_path / "study.db", name, sampler=sampler, seed=seed, population_size=4,
                        directions=["minimize", "minimize"])


LRS = (1e-4, 1e-3, 1e-2)


def _mask(params):
    return S.mask_of(params, BLOCKS, method="lora", mode="full", granularity="transformer", options={})


def _run(study, n, batch=2, trained=None):
    """optimize() with a stand-in evaluation (the objectives are arithmetic on the mask); `trained`
    collects every configuration that was actually evaluated."""
    def evaluate(proposals):
        out = []
        for _, mask in proposals:
            if trained is not None:
                trained.append(mask.digest())
            out.append(S.Outcome([sum(mask.bits) + mask.lr, len(mask.bits) - sum(mask.bits)], {"mask": mask.digest()}))
        return out

    S.optimize(study, S.search_space(len(BLOCKS), LRS), n_trials=n, batch_size=batch, make_mask=_mask,
               evaluate=evaluate, seed=0)


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
    """A search that holds the study file's lock recovers every RUNNING trial at once (a search that
    died left them): failed, and enqueued once more with the same parameters."""
    from memcontrol import study_storage

    st = _study(tmp_path)
    space = S.search_space(len(BLOCKS), LRS)
    t = st.ask(space)
    assert study_storage.recover_orphans(st) == [t.number]
    assert st.trials[t.number].state == TrialState.FAIL
    retry = st.ask(space)
    assert retry.params == t.params and study_storage.retried_from(st.trials[retry.number]) == t.number
    st.tell(retry, state=TrialState.FAIL)
    # a retry whose worker died too is not retried again (RetryHeartbeatStaleTrialCallback(max_retry=1))
    again = st.ask(space)
    assert study_storage.recover_orphans(st) == [again.number]
    assert len(st.get_trials(states=(TrialState.WAITING,))) == 1
    assert study_storage.recover_orphans(st) == []


def test_a_trial_without_heartbeat_is_retried_once_by_optuna(tmp_path):
    """The heartbeat path (any storage, no lock): a trial whose heartbeat stopped for the grace period
    is failed by optuna.storages.fail_stale_trials and re-enqueued by the retry callback; one still
    beating is left alone. Real waits of a few seconds (heartbeat 1 s, grace 2 s)."""
    import time

    from memcontrol import study_storage

    st = S.open_study(tmp_path / "study.db", "s", sampler="nsga2", seed=0, population_size=4,
                      directions=["minimize", "minimize"], heartbeat_interval=1, grace_period=2)
    space = S.search_space(len(BLOCKS), LRS)
    dead, alive = S.ask_batch(st, space, 2)  # each gets its first heartbeat at ask
    with study_storage.beating(st, alive._trial_id):
        time.sleep(3.5)
        assert study_storage.fail_stale(st) == [dead.number]
    assert st.trials[alive.number].state == TrialState.RUNNING
    retry = st.ask(space)
    assert retry.params == dead.params and study_storage.retried_from(st.trials[retry.number]) == dead.number


def test_nan_is_failed_with_reason(tmp_path):
    st = _study(tmp_path)
    t = st.ask(S.search_space(len(BLOCKS), LRS))
    S.tell(st, t, [float("nan"), 1.0])
    ft = st.trials[t.number]
    assert ft.state == TrialState.FAIL and ft.user_attrs["fail_reason"] == "nan objective"


def test_other_sampler_settings_get_their_own_study(tmp_path):
    """A `dvc exp run -S search.sampler=...` searches anew in a sibling study of the same file; the
    original study, with its sampler, stays resumable."""
    first = _study(tmp_path, "nsga2")
    first.tell(first.ask(S.search_space(len(BLOCKS), LRS)), [0.5, 0.5])
    other = _study(tmp_path, "tpe")
    assert other.study_name == "s.tpe-seed0-pop4" and other.user_attrs["sampler"] == "tpe" and not other.trials
    assert _study(tmp_path, "tpe").study_name == "s.tpe-seed0-pop4"  # and resumes there
    again = _study(tmp_path, "nsga2")
    assert again.study_name == "s" and again.user_attrs["sampler"] == "nsga2" and len(again.trials) == 1


def test_no_configuration_is_scored_twice(tmp_path):
    """Two blocks and one LR: 4 configurations. NSGA-II soon proposes repeats; they are answered from
    the earlier result (same values, marked duplicate_of) and the budget counts distinct ones."""
    st = S.open_study(tmp_path / "study.db", "s", sampler="nsga2", seed=0, population_size=2,
                      directions=["minimize", "minimize"])
    space = S.search_space(2, (1e-3,))
    trained = []

    def evaluate(proposals):
        trained.extend(m.digest() for _, m in proposals)
        return [S.Outcome([sum(m.bits), 2 - sum(m.bits)], {"bits": m.bits}) for _, m in proposals]

    make = lambda p: S.mask_of(p, BLOCKS[:2], method="lora", mode="full", granularity="transformer", options={})
    told = []  # scored configurations after each told batch (the search's progress line reports them)
    S.optimize(st, space, n_trials=4, batch_size=3, make_mask=make, evaluate=evaluate, seed=0,
               on_told=lambda: told.append(S.n_finished(st)))
    assert len(trained) == len(set(trained)) == 4 == S.n_finished(st)
    assert told == sorted(told) and told[-1] == 4
    done = st.get_trials(states=(TrialState.COMPLETE,))
    repeats = [t for t in done if "duplicate_of" in t.user_attrs]
    for t in repeats:
        assert t.values == st.trials[t.user_attrs["duplicate_of"]].values
        assert t.user_attrs["mask_digest"] == st.trials[t.user_attrs["duplicate_of"]].user_attrs["mask_digest"]
    assert len(done) == 4 + len(repeats)


def test_resumed_search_scores_as_many_distinct_configurations_as_an_uninterrupted_one(tmp_path):
    """A rebuilt sampler replays its first proposals; they cost no budget, so the resumed study ends
    with exactly n_trials distinct scored configurations, none trained twice."""
    whole, trained = _study(tmp_path / "a"), []
    _run(whole, 10, trained=trained)
    assert len(trained) == len(set(trained)) == 10
    part, trained = _study(tmp_path / "b"), []
    _run(part, 3, trained=trained)
    _run(_study(tmp_path / "b"), 10, trained=trained)  # a new process, same seed
    assert len(trained) == len(set(trained)) == 10 == S.n_finished(_study(tmp_path / "b"))


class _Killed(BaseException):
    """Stands for a SIGKILL: the batch's trials stay RUNNING, nothing of it is told."""


def _killable_run(study, n, batch, *, kill_at=None, kill_asking=None, records=None, trained=None, relative=(),
                  first=()):
    """optimize() whose evaluation dies before its `kill_at`-th evaluation (counted over the whole
    run), or that dies between two asks, after its `kill_asking`-th proposal; `records` stands for
    the arms' metrics.json files: a finished evaluation is reused, not trained again, as run_arm does."""
    records = {} if records is None else records
    count, asked = [0], [0]

    def make_mask(trial_params):
        if asked[0] == kill_asking:
            raise _Killed
        asked[0] += 1
        return _mask(trial_params)

    def evaluate(proposals):
        out = []
        for _, mask in proposals:
            if count[0] == kill_at:
                raise _Killed
            count[0] += 1
            if mask.digest() not in records:
                if trained is not None:
                    trained.append(mask.digest())
                records[mask.digest()] = [sum(mask.bits) * 0.1 + mask.lr, 1.0 + (len(mask.bits) - sum(mask.bits)) * mask.lr]
            out.append(S.Outcome(records[mask.digest()], {"mask": mask.digest()}))
        return out

    S.optimize(study, S.search_space(len(BLOCKS), LRS), n_trials=n, batch_size=batch, make_mask=make_mask,
               evaluate=evaluate, seed=0, relative=relative, first=list(first))


def _scored_in_order(study):
    """Completed trials in the order they were asked: a retry at the place of the trial it repeats."""
    from memcontrol.study_storage import retried_from

    done = study.get_trials(states=(TrialState.COMPLETE,))
    return [(t.params, t.values, "duplicate_of" in t.user_attrs)
            for t in sorted(done, key=lambda t: (retried_from(t) if retried_from(t) is not None else t.number))]


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
@pytest.mark.parametrize("kill", [("evaluating", 2), ("evaluating", 9), ("asking", 2), ("asking", 6), ("asking", 10)])
@pytest.mark.parametrize("relative", [(), (1,)])
def test_a_killed_and_resumed_search_asks_and_scores_what_an_uninterrupted_one_does(tmp_path, sampler, kill,
                                                                                      relative):
    """Issue 12 item 2/8: killed mid-batch (its trials left RUNNING) or between two asks of a batch,
    in the first generation or in a bred batch, and rerun in a new process (a rebuilt sampler), the
    search ends with the very trials of an uninterrupted run, in the same order and with the same
    values, and no finished evaluation is trained again."""
    from memcontrol import study_storage

    first = S.anchor_params(len(BLOCKS), LRS) + S.initial_design(3, LRS, seed=0)
    whole = _study(tmp_path / "a", sampler)
    _killable_run(whole, 12, 4, relative=relative, first=first)
    records, trained = {}, []
    part = _study(tmp_path / "b", sampler)
    where = {"kill_at" if kill[0] == "evaluating" else "kill_asking": kill[1]}
    with pytest.raises(_Killed):
        _killable_run(part, 12, 4, records=records, trained=trained, relative=relative, first=first, **where)
    resumed = _study(tmp_path / "b", sampler)  # the rerun: a new sampler from the same seed
    assert study_storage.recover_orphans(resumed)  # the killed batch's trials, failed and retried
    _killable_run(resumed, 12, 4, records=records, trained=trained, relative=relative, first=first)
    assert _scored_in_order(resumed) == _scored_in_order(whole)
    assert len(trained) == len(set(trained)) == S.n_finished(resumed) == 12


def test_search_stops_after_max_failures_naming_the_first_cause(tmp_path):
    st = _study(tmp_path)
    reasons = iter(f"FileNotFoundError: threshold.json (call {i})" for i in range(100))

    def evaluate(proposals):
        return [S.Outcome(None, reason=next(reasons)) for _ in proposals]

    with pytest.raises(S.SearchError, match=r"4 trials failed in a row .*max_failures=3.*trial 0: "
                                            r"FileNotFoundError: threshold\.json \(call 0\)"):
        S.optimize(st, S.search_space(len(BLOCKS), LRS), n_trials=5, batch_size=2, make_mask=_mask,
                   evaluate=evaluate, seed=0)
    failed = st.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 4 and failed[0].user_attrs["fail_reason"].endswith("(call 0)")  # one whole batch more


def test_a_success_resets_the_failure_count(tmp_path):
    st = _study(tmp_path)
    pattern = iter([False, False, True] * 10)

    def evaluate(proposals):
        return [S.Outcome([1.0, 2.0], {}) if next(pattern) else S.Outcome(None, reason="flaky") for _ in proposals]

    S.optimize(st, S.search_space(len(BLOCKS), LRS), n_trials=3, batch_size=1, make_mask=_mask,
               evaluate=evaluate, seed=0)
    assert S.n_finished(st) == 3 and len(st.get_trials(states=(TrialState.FAIL,))) == 6


# Issue 12 item 2: a resume under other settings is refused, naming the key and both values.
def _changed(params, section: str, **update):
    return params.model_copy(update={section: getattr(params, section).model_copy(update=update)})


BLOCK_NAMES = tuple(f"down_blocks.{i}.attentions.0" for i in range(5))
RESUME_CASES = {  # key -> (how the params change, the old and new values as the message shows them)
    "search.objectives": (lambda p: _changed(p, "search", objectives=("mem_mean_sim", "fid")),
                          '["mem_mean_sim", "kid_vs_unmasked"]', '["mem_mean_sim", "fid"]'),
    "blocks": (None, '["down_blocks.0', '["down_blocks.1'),
    "tuning.method": (lambda p: _changed(p, "tuning", method="bias"), "lora", "bias"),
    "tuning.mode": (lambda p: _changed(p, "tuning", mode="reference"), "full", "reference"),
    "tuning.granularity": (lambda p: _changed(p, "tuning", granularity="resnet"), "transformer", "resnet"),
    "tuning.options": (lambda p: _changed(p, "tuning", options={"rank": 4}), "{}", '{"rank": 4}'),
    "search.learning_rates": (lambda p: _changed(p, "search", learning_rates=(1e-3,)), "[0.0003, 0.001, 0.003]", "[0.001]"),
    "train.steps": (lambda p: _changed(p, "train", steps=7), "150", "7"),
    "train.batch_size": (lambda p: _changed(p, "train", batch_size=2), "8", "2"),
    "train.weight_decay": (lambda p: _changed(p, "train", weight_decay=0.0), "0.01", "0.0"),
    "sample.steps": (lambda p: _changed(p, "sample", steps=3), "20", "3"),
    "metrics.embedder": (lambda p: _changed(p, "metrics", embedder="pixel"), "mobilenet_v2", "pixel"),
    "data.n_repeats": (lambda p: _changed(p, "data", n_repeats=2), "10", "2"),
    "seed": (lambda p: p.model_copy(update={"seed": 5}), "0", "5"),
}


def _resume(tmp_path, params, blocks=BLOCK_NAMES):
    return S.open_study(tmp_path / "study.db", "s", sampler="nsga2", seed=0, population_size=4,
                        directions=["minimize", "minimize"], settings=S.resume_settings(params, blocks))


@pytest.mark.parametrize("key", sorted(RESUME_CASES))
def test_resume_with_another_setting_is_refused_naming_the_key_and_both_values(tmp_path, key):
    from memcontrol.config import Params

    change, old, new = RESUME_CASES[key]
    params = Params()
    first = _resume(tmp_path, params)
    first.tell(first.ask(S.search_space(len(BLOCK_NAMES), LRS)), [0.5, 0.5])
    other, blocks = (params, BLOCK_NAMES[1:]) if change is None else (change(params), BLOCK_NAMES)
    with pytest.raises(S.ResumeError) as err:
        _resume(tmp_path, other, blocks)
    msg = str(err.value)
    assert f"{key}={old}" in msg and f"{key}={new}" in msg and "search.study_name" in msg
    assert len(_resume(tmp_path, params).trials) == 1  # the original settings still resume it


def test_resume_allows_throughput_settings_and_a_study_without_trials(tmp_path):
    from memcontrol.config import Params

    params = Params()
    _resume(tmp_path, _changed(params, "train", steps=3))  # no trials yet: the new settings are recorded
    st = _resume(tmp_path, params)
    assert st.user_attrs["settings"]["train.steps"] == params.train.steps
    st.tell(st.ask(S.search_space(len(BLOCK_NAMES), LRS)), [0.5, 0.5])
    faster = _changed(_changed(_changed(params, "train", device="cpu"), "sample", batch_size=2), "search", n_trials=50)
    assert len(_resume(tmp_path, faster).trials) == 1


def test_a_second_search_on_the_same_study_is_refused_and_a_killed_one_frees_it(tmp_path):
    import os
    import signal

    db = tmp_path / "search" / "study.db"
    with S.study_lock(db):
        with pytest.raises(S.StudyBusy, match=rf"study\.db: another search \(host:pid {socket.gethostname()}:{os.getpid()}\)"):
            with S.study_lock(db):
                pass
    pid = os.fork()
    if pid == 0:  # a search that takes the lock and is killed holding it
        with S.study_lock(db):
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with S.study_lock(db):  # the kernel released the dead holder's lock: no stale lock to clean up
        pass


def _relative_run(study, n, batch, kid_of, seen_batches):
    """optimize() with a relative second objective: kid_of(mask) is the raw quality value."""
    def evaluate(proposals):
        seen_batches.append([all(m.bits) for _, m in proposals])
        return [S.Outcome([sum(m.bits) * 0.1, kid_of(m)], {"mask": m.digest()}) for _, m in proposals]

    for anchor in S.anchor_params(len(BLOCKS), LRS):
        study.enqueue_trial(anchor)
    S.optimize(study, S.search_space(len(BLOCKS), LRS), n_trials=n, batch_size=batch, make_mask=_mask,
               evaluate=evaluate, seed=0, relative=(1,))


def test_relative_objective_is_told_as_a_ratio_to_the_anchor_at_the_trials_lr(tmp_path):
    st = _study(tmp_path)
    kid_of = lambda m: {1e-4: 0.4, 1e-3: 0.2, 1e-2: 0.1}[m.lr] * (1 + (len(m.bits) - sum(m.bits)))
    batches = []
    _relative_run(st, 9, 2, kid_of, batches)
    # the 3 anchors run first, in batches of their own, even with batch_size 2
    assert batches[:2] == [[True, True], [True]] and not any(any(b) for b in batches[2:])
    trials = S.completed(st)
    assert len(trials) == 9
    for t in trials:
        raw = t.user_attrs["raw_values"]
        anchor = {1e-4: 0.4, 1e-3: 0.2, 1e-2: 0.1}[t.params["lr"]]
        assert t.values[0] == raw[0] and t.values[1] == pytest.approx(raw[1] / anchor)
        assert (t.values[1] == pytest.approx(1.0)) == anchors.is_anchor(t.params)


def test_a_relative_objective_without_a_positive_anchor_fails_the_search_naming_why(tmp_path):
    st = _study(tmp_path)
    with pytest.raises(S.SearchError, match="non-positive quality value"):
        _relative_run(st, 9, 3, lambda m: -0.01 if m.lr == 1e-4 else 0.1, [])


def test_the_initial_design_gives_every_learning_rate_its_share_and_the_sampler_draws_the_bits(tmp_path):
    starts = S.initial_design(7, LRS, seed=3)
    assert sorted(s["lr"] for s in starts).count(LRS[0]) in (2, 3) and {s["lr"] for s in starts} == set(LRS)
    assert all(sorted(s) == ["lr"] for s in starts)
    assert S.initial_design(7, LRS, seed=3) == starts
    methods = S.initial_design(6, LRS, ("lora", "svdiff"), seed=0)
    assert len({(s["method"], s["lr"]) for s in methods}) == 6
    st = _study(tmp_path)
    for fixed in starts:
        st.enqueue_trial(fixed)
    _run(st, 7)
    assert [t.params["lr"] for t in st.trials[:7]] == [s["lr"] for s in starts]
    assert len({tuple(t.params[S.bit_name(i)] for i in range(len(BLOCKS))) for t in st.trials[:7]}) > 1


def test_a_resume_runs_a_failed_anchor_again(tmp_path):
    st = _study(tmp_path)
    anchor_list = S.anchor_params(len(BLOCKS), LRS)
    with pytest.raises(S.SearchError, match="a rerun runs it again"):
        _relative_run(st, 9, 3, lambda m: -0.01 if m.lr == 1e-4 else 0.1, [])
    assert anchors.unscored(st, anchor_list) == [anchor_list[0]]  # the two others completed
    for fixed in anchors.unscored(st, anchor_list):
        st.enqueue_trial(fixed)
    assert anchors.unscored(st, anchor_list) == []  # waiting now
