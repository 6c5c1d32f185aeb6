"""The outer loop: an Optuna multi-objective study over one bit per maskable block plus the
learning rate, driven by ask/tell so the evaluation (fine-tune, generate, score) stays ours."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from memcontrol.tuning import Mask

log = logging.getLogger(__name__)

SAMPLERS = {
    "nsga2": lambda seed, pop: optuna.samplers.NSGAIISampler(population_size=pop, seed=seed),
    "tpe": lambda seed, pop: optuna.samplers.TPESampler(seed=seed, n_startup_trials=pop, multivariate=True),
    "random": lambda seed, pop: optuna.samplers.RandomSampler(seed=seed),
}


def bit_name(i: int) -> str:
    return f"b{i:02d}"


def search_space(n_blocks: int, lr_min: float, lr_max: float) -> dict:
    space = {bit_name(i): CategoricalDistribution([0, 1]) for i in range(n_blocks)}
    space["lr"] = FloatDistribution(lr_min, lr_max, log=True)
    return space


def open_study(
    storage: Path, name: str, *, sampler: str, seed: int, population_size: int, directions: list[str]
) -> optuna.Study:
    """Create or resume the study in an SQLite file. The storage does not keep the sampler's state,
    so the sampler's name and seed are recorded as user attrs. If study `name` was made with other
    sampler settings, these settings get their own study `name.<sampler>-seed<seed>-pop<size>` in the
    same file (so `dvc exp run -S search.sampler=random` searches anew and the original study stays
    resumable); `study.study_name` says which one was opened."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler `{sampler}`; known: {sorted(SAMPLERS)}")
    storage.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage.resolve()}"
    attrs = {"sampler": sampler, "seed": seed, "population_size": population_size}
    if name in {s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)}:
        old = optuna.load_study(study_name=name, storage=url).user_attrs
        if any(old.get(k) not in (None, v) for k, v in attrs.items()):
            log.info("study `%s` was made with other sampler settings; using its sibling for %s", name, attrs)
            name = f"{name}.{sampler}-seed{seed}-pop{population_size}"
    study = optuna.create_study(
        study_name=name,
        storage=url,
        directions=directions,
        sampler=SAMPLERS[sampler](seed, population_size),
        load_if_exists=True,
    )
    for k, v in attrs.items():
        if study.user_attrs.get(k) is None:
            study.set_user_attr(k, v)
    return study


def _alive(owner: str) -> bool:
    host, _, pid = owner.partition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed worker of this host are failed and re-enqueued with the
    same parameters, so a rerun continues the study instead of losing or restarting them."""
    redone = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(t.user_attrs.get("owner", "")):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        redone.append(t.number)
    if redone:
        log.warning("re-enqueued interrupted trials %s", redone)
    return redone


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def ask_batch(study: optuna.Study, space: dict, n: int) -> list[optuna.Trial]:
    trials = []
    for _ in range(n):
        t = study.ask(space)
        t.set_user_attr("owner", f"{socket.gethostname()}:{os.getpid()}")
        trials.append(t)
    return trials


def mask_of(params: dict, blocks: tuple[str, ...], *, method: str, mode: str, granularity: str, options: dict) -> Mask:
    bits = tuple(int(params[bit_name(i)]) for i in range(len(blocks)))
    return Mask(method=method, blocks=blocks, bits=bits, lr=float(params["lr"]), mode=mode,
                granularity=granularity, options=dict(options))


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, *, reason: str = "") -> None:
    """A failed or NaN evaluation is told as FAIL with its reason, so it stays off the front."""
    if values is None or any(v != v for v in values):
        trial.set_user_attr("fail_reason", reason or "nan objective")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, values)


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
