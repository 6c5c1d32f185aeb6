"""Progress a person can follow, fed by the library's (label, done, total) callbacks: rich progress
bars on a terminal, and otherwise (a log file, CI, `dvc repro` output) a log line per step at most
every MEMCONTROL_PROGRESS_SECONDS (default 15 s) plus one when the step ends, with an ETA.
`report_search` logs the outer loop's state after each trial: trial k of n, the Pareto front so far
and an ETA from the measured trial times."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from statistics import mean

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("memcontrol.progress")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LogLines:
    """The (label, done, total) callback for a non-terminal: periodic log lines with an ETA."""

    def __init__(self, interval: float, prefix: str = ""):
        self.interval, self.prefix = interval, prefix
        self.started: dict[str, float] = {}
        self.logged: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self.started.setdefault(label, now)
        finished = done >= total
        if not finished and now - self.logged.get(label, float("-inf")) < self.interval:
            return
        self.logged[label] = now
        elapsed = now - start
        eta = elapsed / done * (total - done) if done else None
        log.info("%s%s: %d/%d (%.0f%%), %s elapsed, ETA %s", self.prefix, label, done, total,
                 100.0 * done / max(total, 1), _duration(elapsed), "done" if finished else _duration(eta))
        if finished:
            self.started.pop(label, None)
            self.logged.pop(label, None)


@contextmanager
def bars(prefix: str = ""):
    """Yield the progress callback: rich bars when stderr is a terminal (rich's test, so
    FORCE_TERMINAL / TTY_COMPATIBLE apply), log lines otherwise.
    `prefix` names what the steps belong to (e.g. "trial abc123: ")."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield LogLines(float(os.environ.get("MEMCONTROL_PROGRESS_SECONDS", "15")), prefix)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as prog:
        ids: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            label = prefix + label
            if label not in ids:
                ids[label] = prog.add_task(label, total=total)
            prog.update(ids[label], completed=done, total=total)
            if done >= total:
                prog.remove_task(ids.pop(label))

        yield update


def report_search(study, n_trials: int, objectives: tuple[str, ...]) -> str:
    """Log (and return) "search: trial k of n", the study's Pareto front so far (Optuna's
    best_trials) and the ETA of the remaining trials from the mean measured trial time."""
    from memcontrol.search import completed

    done = completed(study)  # scored configurations: what search.n_trials counts (not answered repeats)
    # a batch is trained one after another and told together: a trial's time runs from its start or
    # the previous completion, whichever is later, so a batch's trials sum to the batch's wall time
    seconds, previous = [], None
    for t in sorted((t for t in done if t.datetime_start and t.datetime_complete), key=lambda t: t.datetime_complete):
        start = t.datetime_start if previous is None else max(t.datetime_start, previous)
        seconds.append((t.datetime_complete - start).total_seconds())
        previous = t.datetime_complete
    per_trial = mean(seconds) if seconds else None
    left = max(n_trials - len(done), 0)
    front = sorted((t for t in study.best_trials if "duplicate_of" not in t.user_attrs),
                   key=lambda t: t.number) if done else []
    shown = "; ".join(f"#{t.number} " + ", ".join(f"{o} {v:.4g}" for o, v in zip(objectives, t.values))
                      for t in front[:6]) + ("; ..." if len(front) > 6 else "")
    line = (f"search: trial {len(done)} of {n_trials}; Pareto front ({len(front)}): {shown or '-'}; "
            f"{_duration(per_trial)} per trial, ETA {_duration(per_trial * left if per_trial is not None else None)}")
    log.info(line)
    return line
