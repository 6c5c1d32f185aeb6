"""The outer loop: an Optuna multi-objective study over one bit per maskable block plus the
learning rate, driven by ask/tell so the evaluation (fine-tune, generate, score) stays ours."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import numpy as np
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from memcontrol import study_storage
from memcontrol.anchors import is_anchor, pending_anchors, relative_values
from memcontrol.errors import UserError
from memcontrol.resume import (ASKING, ResumeError, check_resume, enqueue_first, first_trials, resume_settings,
                               restore_sampler, save_sampler)
from memcontrol.tuning import Mask

log = logging.getLogger(__name__)

SAMPLERS = {
    "nsga2": lambda seed, pop: optuna.samplers.NSGAIISampler(population_size=pop, seed=seed),
    # constant_liar: a batch's trials still running count as bad points, so one batch's proposals spread out
    "tpe": lambda seed, pop: optuna.samplers.TPESampler(seed=seed, n_startup_trials=pop, multivariate=True,
                                                        constant_liar=True),
    "random": lambda seed, pop: optuna.samplers.RandomSampler(seed=seed),
    # a Gaussian process over the bits (Optuna's log-EHVI for several objectives); `population_size`
    # random trials first
    "gp": lambda seed, pop: optuna.samplers.GPSampler(seed=seed, n_startup_trials=pop, warn_independent_sampling=False),
}


def bit_name(i: int) -> str:
    return f"b{i:02d}"


def search_space(n_blocks: int, learning_rates: tuple[float, ...], methods: tuple[str, ...] = ()) -> dict:
    """One bit per block and the learning rate from a small grid: a finite space, so a proposal
    equal to an earlier one is recognised (and answered from it) rather than trained again. With
    more than one of `methods` (tuning.method a list), the method is chosen too."""
    space = {bit_name(i): CategoricalDistribution([0, 1]) for i in range(n_blocks)}
    space["lr"] = CategoricalDistribution(list(learning_rates))
    if len(methods) > 1:
        space["method"] = CategoricalDistribution(list(methods))
    return space


def open_study(
    storage: Path | str, name: str, *, sampler: str, seed: int, population_size: int, directions: list[str],
    settings: dict | None = None, heartbeat_interval: int = 10, grace_period: int = 60,
) -> optuna.Study:
    """Create or resume the study in `storage`: an SQLite file (a Path) or an SQLAlchemy URL
    (PostgreSQL for several machines), opened with Optuna's heartbeat (memcontrol/study_storage.py).
    The storage does not keep the sampler's state,
    so the sampler's name and seed are recorded as user attrs. If study `name` was made with other
    sampler settings, these settings get their own study `name.<sampler>-seed<seed>-pop<size>` in the
    same file (so `dvc exp run -S search.sampler=random` searches anew and the original study stays
    resumable); `study.study_name` says which one was opened. `settings` (see `resume_settings`)
    are what the trials' values depend on: resuming a study that has trials under other settings
    raises ResumeError instead of pairing old values with new names."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler `{sampler}`; known: {sorted(SAMPLERS)}")
    url = f"sqlite:///{Path(storage).resolve()}" if isinstance(storage, Path) else storage
    rdb = study_storage.open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    attrs = {"sampler": sampler, "seed": seed, "population_size": population_size}
    if name in {s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)}:
        old = optuna.load_study(study_name=name, storage=rdb).user_attrs
        if any(old.get(k) not in (None, v) for k, v in attrs.items()):
            log.info("study `%s` was made with other sampler settings; using its sibling for %s", name, attrs)
            name = f"{name}.{sampler}-seed{seed}-pop{population_size}"
    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        directions=directions,
        sampler=SAMPLERS[sampler](seed, population_size),
        load_if_exists=True,
    )
    for k, v in attrs.items():
        if study.user_attrs.get(k) is None:
            study.set_user_attr(k, v)
    if settings is not None:
        check_resume(study, settings, study_storage.sqlite_file(url) or study_storage.shown(url))
    return study


class StudyBusy(UserError, RuntimeError):
    """Another search holds the study file."""


@contextmanager
def study_lock(storage: Path) -> Iterator[None]:
    """One search per study file at a time. Two would each rebuild the sampler from the same seed,
    ask the same proposals and train them twice, and each would take the other's RUNNING trials for
    its own. An flock (released by the kernel when the holder dies, so a SIGKILL leaves no stale
    lock) on `study.db.lock`, which names the holder."""
    storage.parent.mkdir(parents=True, exist_ok=True)
    lock = storage.with_name(storage.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read_text().strip() or "unknown"
        os.close(fd)
        raise StudyBusy(f"{storage}: another search (host:pid {holder}) is running on this study; wait for it "
                        "to finish, or run this one in another workdir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def unmasked_params(n_blocks: int, learning_rates: tuple[float, ...], methods: tuple[str, ...] = ()) -> dict:
    """Every block on, the middle learning rate of the grid: the method with no mask (the first
    method of a list)."""
    out = {**{bit_name(i): 1 for i in range(n_blocks)}, "lr": learning_rates[len(learning_rates) // 2]}
    return {**out, "method": methods[0]} if len(methods) > 1 else out


def anchor_params(n_blocks: int, learning_rates: tuple[float, ...], methods: tuple[str, ...] = ()) -> list[dict]:
    """The method with no mask (every block on) at each learning rate of the grid, for each method
    of a list: the search's first trials, the front's anchors and the selection rule's quality
    reference for every trial at that learning rate (memcontrol/selection.py)."""
    on = {bit_name(i): 1 for i in range(n_blocks)}
    named = methods if len(methods) > 1 else (None,)  # a single method is not a searched parameter
    return [{**on, "lr": lr, **({"method": m} if m else {})} for m in named for lr in learning_rates]


def initial_design(n: int, learning_rates: tuple[float, ...], methods: tuple[str, ...] = (), seed: int = 0) -> list[dict]:
    """`n` partial configurations (`lr`, and `method` for a list) that the sampler completes with
    random bits: the random first generation, stratified over the grid so that every learning rate
    gets its share (drawn unstratified, the default's 5 random starts once held no trial at 1e-4:
    the rate whose masks copy least, docs/search.md "The loop")."""
    cells = [{"lr": lr, **({"method": m} if len(methods) > 1 else {})}
             for m in (methods if len(methods) > 1 else (None,)) for lr in learning_rates]
    rng = np.random.default_rng([seed, 7])
    out: list[dict] = []
    while len(out) < n:
        out += [cells[i] for i in rng.permutation(len(cells))]
    return out[:n]


def evaluated(study: optuna.Study) -> dict[str, FrozenTrial]:
    """mask digest -> the completed (or early-stopped) trial that trained and scored it (answers to
    duplicates excluded)."""
    return {t.user_attrs["mask_digest"]: t for t in completed(study) + stopped(study) if "mask_digest" in t.user_attrs}


def n_finished(study: optuna.Study) -> int:
    """Distinct configurations scored, early-stopped ones included: what `search.n_trials` counts
    (a repeat costs no budget)."""
    return len(completed(study)) + len(stopped(study))


def stopped(study: optuna.Study) -> list[FrozenTrial]:
    """Trials stopped at a rung (memcontrol/fidelity.py): PRUNED, with `stopped_at` and `partial_values`."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
            if "stopped_at" in t.user_attrs and "duplicate_of" not in t.user_attrs]


def answer_duplicate(study: optuna.Study, trial: optuna.Trial, earlier: FrozenTrial) -> None:
    """Tell `trial` the values of the earlier trial of the same configuration, without training:
    the sampler learns the same as from the first, and the budget is not spent. A repeat of an
    early-stopped trial is stopped too."""
    trial.set_user_attr("duplicate_of", earlier.number)
    if earlier.state == TrialState.PRUNED:
        for key in ("stopped_at", "partial_values"):
            trial.set_user_attr(key, earlier.user_attrs.get(key))
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, earlier.values)


def unseen_configuration(study: optuna.Study, space: dict, seed: int) -> dict | None:
    """A random configuration of `space` that no completed trial holds, or None if all are taken.
    Used when the sampler keeps proposing what was already scored (a converged NSGA-II can)."""
    taken = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}
    rng = np.random.default_rng([seed, len(taken)])
    names = sorted(space)
    for _ in range(1000):
        cand = {k: space[k].choices[int(rng.integers(len(space[k].choices)))] for k in names}
        if tuple(sorted(cand.items())) not in taken:
            return cand
    return None


def ask_batch(study: optuna.Study, space: dict, n: int) -> list[optuna.Trial]:
    """`n` proposals (a WAITING trial, e.g. the retry of one whose worker died, comes first). Each gets
    a first heartbeat now, so one that never reaches a worker (the search died first) is found
    stale too (memcontrol/study_storage.py)."""
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": the
        warnings.filterwarnings("ignore", "Heartbeat of storage")  # ask/tell loop beats as optimize does
        trials = [study.ask(space) for _ in range(n)]
    if study_storage.heartbeat_interval(study) is not None:
        for t in trials:
            study._storage.record_heartbeat(t._trial_id)
    save_sampler(study)  # a resumed search restores it (memcontrol/resume.py)
    return trials


def fill_batch(
    study: optuna.Study, space: dict, n: int, make_mask: Callable[[dict], Mask], scored: dict[str, FrozenTrial],
    seed: int, repeats: int = 0, failed: dict[str, int] | None = None,
) -> tuple[list[tuple[optuna.Trial, Mask]], list[tuple[optuna.Trial, str]], int]:
    """Ask until `n` proposals are distinct from every scored configuration and from each other.

    A proposal repeating a scored configuration is answered from it at once (it costs nothing and
    the sampler learns it); one repeating a member of this batch is kept as a twin, answered once
    its twin is scored, and another is asked (TPE's constant liar already steers it away from the
    batch's running trials). After MAX_REPEATS repeats in a row, one unscored configuration of the
    space is drawn at random. A proposal of a configuration that failed earlier in this search
    (`failed`: digest -> trial; the empty mask has nothing to train, say) fails at once as a repeat:
    samplers that ignore failed trials (GPSampler) would otherwise propose it until the failure cap.
    Returns (batch, twins, repeats so far); the batch is short (or empty)
    only when every configuration of the space is taken."""
    batch: list[tuple[optuna.Trial, Mask]] = []
    twins: list[tuple[optuna.Trial, str]] = []
    while len(batch) < n:
        if repeats >= MAX_REPEATS:
            fresh = unseen_configuration(study, space, seed)
            if fresh is None:
                break
            log.warning("the sampler repeated %d configurations in a row; trying an unscored one", repeats)
            study.enqueue_trial(fresh)
            repeats = 0
        [trial] = ask_batch(study, space, 1)
        mask = make_mask(trial.params)
        digest = mask.digest()
        trial.set_user_attr("mask_digest", digest)
        if digest in scored:
            answer_duplicate(study, trial, scored[digest])
            repeats += 1
        elif failed and digest in failed:
            trial.set_user_attr("duplicate_of", failed[digest])
            tell(study, trial, None, reason=f"the same configuration failed in trial {failed[digest]}")
            repeats += 1
        elif any(m.digest() == digest for _, m in batch):
            twins.append((trial, digest))
            repeats += 1
        else:
            batch.append((trial, mask))
            repeats = 0
    return batch, twins, repeats


def mask_of(params: dict, blocks: tuple[str, ...], *, method: str, mode: str, granularity: str, options: dict) -> Mask:
    """The mask of a trial's parameters; a `method` parameter (a searched method) overrides `method`."""
    bits = tuple(int(params[bit_name(i)]) for i in range(len(blocks)))
    return Mask(method=params.get("method", method), blocks=blocks, bits=bits, lr=float(params["lr"]), mode=mode,
                granularity=granularity, options=dict(options))


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, *, reason: str = "") -> None:
    """A failed or NaN evaluation is told as FAIL with its reason, so it stays off the front."""
    if values is None or any(v != v for v in values):
        trial.set_user_attr("fail_reason", reason or "nan objective")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, values)


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials that were trained and scored (not answers to a duplicate proposal)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs]


# After this many proposals in a row that repeat scored configurations, one unscored configuration
# is drawn at random: a converged sampler must not stall the search.
MAX_REPEATS = 8


class SearchError(UserError, RuntimeError):
    """The search cannot go on (every trial fails); the message names the first failure's cause."""


@dataclass
class Outcome:
    """What evaluating one proposal gave: objective values and the arm's record, or a failure reason."""

    values: list[float] | None
    record: dict | None = None
    reason: str = ""
    lost: bool = False  # its worker died: the trial stays RUNNING until the heartbeat fails and retries it
    stopped_at: int | None = None  # the rung step where it was stopped early; `values` are that rung's


def optimize(
    study: optuna.Study,
    space: dict,
    *,
    n_trials: int,
    batch_size: int,
    make_mask: Callable[[dict], Mask],
    evaluate: Callable[[list[tuple[optuna.Trial, Mask]]], list[Outcome]],
    seed: int,
    max_failures: int = 3,
    on_told: Callable[[], None] | None = None,
    relative: tuple[int, ...] = (),
    first: list[dict] = (),
) -> None:
    """The ask/tell loop until `n_trials` distinct configurations are scored.

    Each round asks `batch_size` distinct unscored proposals (`fill_batch`: a proposal whose mask
    was scored before, or earlier in the same batch, is answered from that result without training,
    costs no budget, and another is asked); they go to `evaluate` together (which may run them in parallel) and are told their values, or FAIL with
    the reason. `record` of each outcome is kept on the trial (user attr) for the trials table.
    After `max_failures` failed evaluations in a row the search stops with SearchError naming the
    first one's cause (a missing file fails every trial alike; asking again would loop forever).
    `on_told` is called after each batch is told (e.g. to report progress).

    A trial whose worker died (outcome `lost`) is not told: before each batch, Optuna's heartbeat
    check (study_storage.fail_stale) fails it once its grace period is over and enqueues it again
    with the same parameters. Trials still RUNNING count against the budget until then, so the study
    ends with exactly `n_trials` scored configurations.

    `relative`: positions of objectives told as a ratio to the trial's anchor (config.RELATIVE). The
    anchors (the enqueued trials with every block on) are then asked in batches of their own and
    scored before any other trial, and each trial keeps its raw values as user attr `raw_values`.

    `first`: configurations asked before the sampler's own proposals, in order (the anchors, then
    the first generation; a partial one is completed by the sampler), kept on a new study as its plan
    and enqueued a batch at a time. A resume asks what an uninterrupted run would have
    (memcontrol/resume.py): from the sampler's random states as they were after the last ask, the
    batch a kill interrupted is asked again at its size, its retries (WAITING) first."""
    plan = first_trials(study, list(first))
    restore_sampler(study)  # the random stream as after the last ask (asking a retry draws nothing)
    interrupted = study.user_attrs.get(ASKING, 0)  # the size of the batch being asked when the last search stopped
    scored = evaluated(study)
    repeats = 0
    failures: list[tuple[int, str]] = []
    failed: dict[str, int] = {}  # configurations that failed here: a repeat fails without a rerun
    anchor_failed: tuple[int, str] | None = None
    while True:
        study_storage.fail_stale(study)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        left = n_trials - n_finished(study) - running
        if left <= 0:
            if not running:
                break
            time.sleep(study_storage.heartbeat_interval(study) or 1)  # until they finish or go stale
            continue
        size = min(batch_size, left)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting and interrupted:  # a resume: the batch a kill interrupted, at its size (its retries first)
            size = min(interrupted, left)
        elif waiting:  # retries of trials whose worker died: told before anything new is asked
            size = min(size, waiting)
        else:
            enqueue_first(study, plan, size, anchors_alone=bool(relative))
        if relative:
            waiting, running_anchors = pending_anchors(study)
            if waiting:
                size = min(size, waiting)
            elif running_anchors:  # a lost anchor: its retry comes once its heartbeat is stale
                time.sleep(study_storage.heartbeat_interval(study) or 1)
                continue
        study.set_user_attr(ASKING, size)
        interrupted = 0
        batch, twins, repeats = fill_batch(study, space, size, make_mask, scored, seed, repeats, failed)
        if not batch:
            if running:  # the rest of the space is being scored by other workers
                time.sleep(study_storage.heartbeat_interval(study) or 1)
                continue
            log.warning("every configuration of the space is scored: the search ends with %d", n_finished(study))
            break
        for (trial, mask), outcome in zip(batch, evaluate(batch)):
            if outcome.lost:
                log.warning("trial %d lost its worker (%s); it is retried once its heartbeat is stale",
                            trial.number, outcome.reason)
                continue
            if outcome.record is not None:
                trial.set_user_attr("record", json.dumps(outcome.record, default=str))
            if relative and outcome.values is not None and all(v == v for v in outcome.values):
                trial.set_user_attr("raw_values", list(outcome.values))
                values, why = relative_values(completed(study), trial.params, list(outcome.values), relative)
                outcome = Outcome(values, outcome.record, reason=why, stopped_at=outcome.stopped_at)
            if outcome.stopped_at is not None:
                trial.set_user_attr("stopped_at", outcome.stopped_at)
                trial.set_user_attr("partial_values", outcome.values)
                study.tell(trial, state=TrialState.PRUNED)
            else:
                tell(study, trial, outcome.values, reason=outcome.reason)
            if outcome.values is not None and all(v == v for v in outcome.values):
                scored[mask.digest()] = study.get_trials(deepcopy=False)[trial.number]
                failures = []
            else:
                failures.append((trial.number, outcome.reason or "nan objective"))
                failed.setdefault(mask.digest(), trial.number)
                if relative and is_anchor(trial.params):
                    anchor_failed = anchor_failed or (trial.number, outcome.reason or "nan objective")
        for trial, digest in twins:
            if digest in scored:
                answer_duplicate(study, trial, scored[digest])
            else:  # its twin failed: so does it
                tell(study, trial, None, reason="the same configuration failed in this batch")
        if on_told is not None:
            on_told()
        if anchor_failed:  # every trial at its learning rate would be told a ratio to nothing
            number, reason = anchor_failed
            raise SearchError(f"anchor trial {number} (every block on, the reference of the relative objective "
                              f"at its learning rate) failed: {reason}; a rerun runs it again")
        if len(failures) >= max_failures:  # checked once the whole batch is told: no trial left RUNNING
            number, reason = failures[0]
            raise SearchError(f"{len(failures)} trials failed in a row (search.max_failures={max_failures}); "
                              f"the first, trial {number}: {reason}")
