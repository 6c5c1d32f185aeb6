"""Where the Optuna study lives, and how a trial whose worker died is found and run again.

The study is an Optuna `RDBStorage` at an SQLAlchemy URL: by default an SQLite file under the
working directory (one machine), or a PostgreSQL database shared by several machines
(`search.storage`, docs/scale_out.md). Dead workers are found by Optuna's heartbeat, as
`study.optimize` does it, applied to our ask/tell loop:

- the process evaluating a trial runs Optuna's heartbeat thread (`heartbeat`, the helper
  `study.optimize` itself wraps around the objective), recording the trial's heartbeat every
  `heartbeat_interval` seconds;
- before each batch is asked, `fail_stale` calls `optuna.storages.fail_stale_trials`: a RUNNING
  trial without a heartbeat for `grace_period` seconds is failed, and the storage's
  `RetryHeartbeatStaleTrialCallback(max_retry=1)` enqueues it once more with the same parameters
  (a WAITING trial, which the next `study.ask` takes first).

No host or PID is consulted. What the single-machine SQLite path adds (`recover_orphans`): the
search holds the study file's lock (memcontrol.search.study_lock), so a trial left RUNNING when it
starts belongs to no live search and is failed and retried at once rather than after the grace
period."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # as study.optimize
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger(__name__)

# A trial whose worker died is run again once; if the retry's worker dies too, it stays failed.
MAX_RETRY = 1


def resolve_url(storage: str | None, root: Path, default: Path) -> str:
    """`search.storage` as a full SQLAlchemy URL: None is the SQLite file `default`; a relative
    SQLite path is relative to the working directory `root` (as tracking.mlflow_uri)."""
    if storage is None:
        return f"sqlite:///{default.resolve()}"
    prefix = "sqlite:///"
    if storage.startswith(prefix) and not storage[len(prefix):].startswith("/"):
        return prefix + str((root / storage[len(prefix):]).resolve())
    return storage


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for any other database)."""
    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def shown(url: str) -> str:
    """The URL for messages and logs, password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str, *, heartbeat_interval: int, grace_period: int) -> RDBStorage:
    """The study's storage with Optuna's heartbeat and its retry callback (see the module doc)."""
    file = sqlite_file(url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeat arguments are "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            # many workers each hold a connection: recycle dead ones instead of failing on them
            engine_kwargs=None if file is not None else {"pool_pre_ping": True},
        )


@functools.lru_cache(maxsize=8)
def _worker_storage(url: str, heartbeat_interval: int) -> RDBStorage:
    """One storage per process and URL: a worker runs many trials against the same study."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=heartbeat_interval,
                          engine_kwargs=None if sqlite_file(url) is not None else {"pool_pre_ping": True})


@contextmanager
def heartbeat(url: str, trial_id: int, heartbeat_interval: int, *, worker: str | None = None) -> Iterator[None]:
    """Record trial `trial_id`'s heartbeat every `heartbeat_interval` s while the block runs (in the
    process that evaluates it: a Dask worker, or the search itself). `worker` is kept on the trial
    as the user attr `worker` (which Dask worker ran it: shown by optuna-dashboard)."""
    storage = _worker_storage(url, heartbeat_interval)
    if worker is not None:
        storage.set_trial_user_attr(trial_id, "worker", worker)
    with get_heartbeat_thread(trial_id, storage):
        yield


@contextmanager
def beating(study: optuna.Study, trial_id: int) -> Iterator[None]:
    """The heartbeat of a trial evaluated in the search's own process (workers: 1)."""
    with get_heartbeat_thread(trial_id, study._storage):
        yield


def heartbeat_interval(study: optuna.Study) -> int | None:
    """None for a storage without heartbeat (an in-memory study, e.g. the samplers' replay)."""
    storage = study._storage
    return storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None


def fail_stale(study: optuna.Study) -> list[int]:
    """Optuna's own check: RUNNING trials without a heartbeat for the grace period are failed and
    (once) enqueued again. Returns the numbers of the trials it failed."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not before or not is_heartbeat_enabled(study._storage):
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)
    if failed:
        log.warning("trials %s lost their worker (no heartbeat for the grace period): failed, and run once "
                    "more with the same parameters", failed)
    return failed


def recover_orphans(study: optuna.Study) -> list[int]:
    """At the start of a search that holds the study's lock (SQLite): every RUNNING trial was left by
    a search that died, so each is failed and retried now, by the same callback the heartbeat uses
    (trials from before heartbeats were recorded included). Returns their numbers."""
    storage = study._storage
    retry = storage.get_heartbeat_stale_trial_callback()
    redone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            redone.append(trial.number)
            if retry is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    retry(study, storage.get_trial(trial._trial_id))
    if redone:
        log.warning("trials %s were left running by a search that stopped: failed, and run once more", redone)
    return redone


def retried_from(trial) -> int | None:
    """The number of the trial a retry repeats (None for a trial that is not a retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
