"""A resumed search: refused under other settings, and otherwise asking what an uninterrupted one
would have asked.

Optuna's storage keeps the trials but not the sampler's random stream, and a rebuilt sampler with
the same seed starts that stream again. So that a search killed after k trials and rerun ends with
the very trials of an uninterrupted run (issue 12, docs/reliability.md "A resumed search"):

- the sampler's random states are saved on the study after every ask (`save_sampler`) and put back
  when a search resumes (`restore_sampler`);
- the first trials (the anchors, the stratified first generation) are a plan stored on the study and
  enqueued a batch at a time (`enqueue_first`), so no trial of a later batch waits in the queue;
- each batch's size is kept on the study before it is asked (user attr `asking_batch_of`), and a
  resumed search first asks the batch the kill interrupted again at that size: its retries and
  whatever it had not asked yet, while the retries are RUNNING, as the originals were
  (memcontrol.search.optimize). A retry is listed at the place of the trial it repeats
  (memcontrol.selection.trials_table).

Not covered: a kill in the milliseconds while a batch's planned trials are enqueued. GPSampler's
fit also warm-starts from kernel parameters kept in the process; it asked the same after a resume
in tests/test_search.py, but nothing guarantees it."""

from __future__ import annotations

import json

import numpy as np
import optuna
from optuna.samplers._lazy_random_state import LazyRandomState

from memcontrol.anchors import is_anchor
from memcontrol.errors import UserError

SAMPLER_STATE, PLAN, PLANNED, ASKING = "sampler_state", "first_trials", "planned", "asking_batch_of"


class ResumeError(UserError, ValueError):
    """A study would be resumed under settings other than those its trials were scored with."""


def resume_settings(params, blocks: tuple[str, ...]) -> dict:
    """What a trial's objective values depend on besides its mask bits and LR: the objectives, the
    candidate blocks, the method and its options, the inner loop (training set, training,
    sampling) and how it is scored (metrics). Throughput-only settings (device, sample.batch_size,
    n_trials) are left out, so they may change between runs; the sampler's settings have their own
    sibling study (`memcontrol.search.open_study`)."""
    train = params.train.model_dump(exclude={"device", "gradient_checkpointing"})
    sample = params.sample.model_dump(exclude={"batch_size"})
    settings = {
        "search.objectives": list(params.search.objectives),
        "search.learning_rates": list(params.search.learning_rates),
        "blocks": list(blocks),
        "tuning.method": params.tuning.method,
        "tuning.mode": params.tuning.mode,
        "tuning.granularity": params.tuning.granularity,
        "tuning.options": dict(params.tuning.options),
        "seed": params.seed,
        "data.data_size_ratio": params.data.data_size_ratio,
        "data.n_repeats": params.data.n_repeats,
        **{f"train.{k}": v for k, v in train.items()},
        **{f"sample.{k}": v for k, v in sample.items()},
        **{f"metrics.{k}": v for k, v in params.metrics.model_dump().items()},
    }
    return json.loads(json.dumps(settings, default=str))  # as the SQLite storage gives it back


def check_resume(study: optuna.Study, settings: dict, storage) -> None:
    """Record `settings` on a study without trials; on one with trials, refuse any difference,
    naming the key and both values (a study from before settings were recorded has only `blocks`)."""
    stored = study.user_attrs.get("settings") or {}
    if not stored and "blocks" in study.user_attrs:
        stored = {"blocks": study.user_attrs["blocks"]}
    if study.get_trials(deepcopy=False):
        for key, now in settings.items():
            if key in stored and stored[key] != now:
                raise ResumeError(
                    f"study `{study.study_name}` in {storage} has {len(study.trials)} trials scored with "
                    f"{key}={_show(stored[key])}, but the params now say {key}={_show(now)}; resuming would "
                    f"pair those values with the new setting. Set a new search.study_name to search anew "
                    f"(e.g. -S search.study_name=...), or restore {key}.")
    study.set_user_attr("settings", {**stored, **settings})


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _random_states(sampler: optuna.samplers.BaseSampler, path: str = "sampler") -> dict[str, np.random.RandomState]:
    """Every numpy random state of `sampler` and of the samplers it holds (NSGA-II's and TPE's
    RandomSampler, GPSampler's independent one), by attribute path."""
    out = {}
    for name, value in sorted(vars(sampler).items()):
        if isinstance(value, LazyRandomState):
            out[f"{path}.{name}"] = value.rng
        elif isinstance(value, np.random.RandomState):
            out[f"{path}.{name}"] = value
        elif isinstance(value, optuna.samplers.BaseSampler):
            out.update(_random_states(value, f"{path}.{name}"))
    return out


def save_sampler(study: optuna.Study) -> None:
    """Keep the sampler's random states on the study (user attr `sampler_state`), as after the last ask."""
    states = {}
    for path, rng in _random_states(study.sampler).items():
        kind, keys, pos, has_gauss, cached = rng.get_state()
        states[path] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    study.set_user_attr(SAMPLER_STATE, states)


def restore_sampler(study: optuna.Study) -> None:
    """Put the saved random states back into a rebuilt sampler (none saved: a new study, or one
    from before they were kept)."""
    saved = study.user_attrs.get(SAMPLER_STATE) or {}
    for path, rng in _random_states(study.sampler).items():
        if path in saved:
            kind, keys, pos, has_gauss, cached = saved[path]
            rng.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def first_trials(study: optuna.Study, first: list[dict]) -> list[dict]:
    """The plan of first trials: `first` stored on a new study; a resumed study keeps its own."""
    if PLAN not in study.user_attrs and not study.get_trials(deepcopy=False):
        study.set_user_attr(PLAN, list(first))
    return study.user_attrs.get(PLAN, [])


def enqueue_first(study: optuna.Study, plan: list[dict], n: int, *, anchors_alone: bool = False) -> None:
    """Enqueue up to `n` of the plan's trials not enqueued yet (each carries its index as user attr
    `planned`; a retry keeps it). With `anchors_alone`, anchors and other trials never share a
    batch."""
    used = [t.user_attrs[PLANNED] for t in study.get_trials(deepcopy=False) if PLANNED in t.user_attrs]
    start = max(used, default=-1) + 1
    batch = plan[start:start + n]
    if anchors_alone and batch:
        alone = is_anchor(batch[0])
        batch = batch[:next((i for i, p in enumerate(batch) if is_anchor(p) != alone), len(batch))]
    for i, fixed in enumerate(batch, start):
        study.enqueue_trial(fixed, user_attrs={PLANNED: i})
