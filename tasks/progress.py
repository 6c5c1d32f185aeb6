"""Progress a person can follow, fed by the library's (label, done, total) callbacks: rich progress
bars on a terminal, and otherwise (a log file, CI, `dvc repro` output) a log line per step at most
every MEMCONTROL_PROGRESS_SECONDS (default 15 s) plus one when the step ends, with an ETA.
On a terminal one rich display holds every bar: a step inside another (a trial's fine-tune inside
the search, a seed inside Stage 2) adds its rows to the display already on screen.
`SearchProgress` shows the outer loop: trial k of n, the Pareto front so far and an ETA from the
measured trial times, as a bar on a terminal and as a log line after each batch (`report_search`)."""

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


_SHOWN: list[Progress] = []  # the rich display on screen, if any (rich allows one at a time)


class Bars:
    """The (label, done, total) callback on a terminal: one row per label in the shared display,
    removed when its step ends (or when the `bars` block ends). `text` replaces the label shown."""

    def __init__(self, prog: Progress, prefix: str):
        self.prog, self.prefix, self.ids = prog, prefix, {}

    def __call__(self, label: str, done: int, total: int, text: str | None = None) -> None:
        key = self.prefix + label
        if key not in self.ids:
            self.ids[key] = self.prog.add_task(key, total=total)
        self.prog.update(self.ids[key], completed=done, total=total, description=self.prefix + (text or label))
        if done >= total:
            self.prog.remove_task(self.ids.pop(key))

    def close(self) -> None:
        for task in self.ids.values():
            self.prog.remove_task(task)
        self.ids.clear()


@contextmanager
def bars(prefix: str = ""):
    """Yield the progress callback: rich bars when stderr is a terminal (rich's test, so
    FORCE_TERMINAL / TTY_COMPATIBLE apply), log lines otherwise.
    `prefix` names what the steps belong to (e.g. "trial abc123: ")."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield LogLines(float(os.environ.get("MEMCONTROL_PROGRESS_SECONDS", "15")), prefix)
        return
    if _SHOWN:  # inside another step: rows in the display already shown
        rows = Bars(_SHOWN[-1], prefix)
        try:
            yield rows
        finally:
            rows.close()
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as prog:
        _SHOWN.append(prog)
        rows = Bars(prog, prefix)
        try:
            yield rows
        finally:
            rows.close()
            _SHOWN.pop()


class SearchProgress:
    """The search's own progress: on a terminal a bar "search: trial k/n | best front so far: ... | ETA ..."
    (k: the trial being trained), and after each told batch `report_search`'s log line."""

    def __init__(self, progress, study, n_trials: int, objectives: tuple[str, ...]):
        self.progress, self.study, self.n_trials, self.objectives = progress, study, n_trials, objectives
        self.front, self.eta = "-", "?"

    def _show(self, done: int, running: int | None) -> None:
        if isinstance(self.progress, Bars):
            now = f"trial {running}/{self.n_trials}" if running else f"{done}/{self.n_trials} trials"
            front = self.front if len(self.front) <= 80 else self.front[:77] + "..."
            self.progress("search", done, self.n_trials,
                          text=f"search: {now} | best front so far: {front} | ETA {self.eta}")

    def trial_started(self, position: int) -> None:
        """The `position`-th (0-based) trial of the batch being evaluated starts."""
        from memcontrol.search import completed

        done = len(completed(self.study))
        self._show(done, min(done + position + 1, self.n_trials))

    def told(self) -> str:
        line, done, self.front, self.eta = _search_state(self.study, self.n_trials, self.objectives)
        log.info(line)
        self._show(done, None)
        return line


def report_search(study, n_trials: int, objectives: tuple[str, ...]) -> str:
    """Log (and return) "search: trial k of n", the study's Pareto front so far (Optuna's
    best_trials) and the ETA of the remaining trials from the mean measured trial time."""
    line = _search_state(study, n_trials, objectives)[0]
    log.info(line)
    return line


def _search_state(study, n_trials: int, objectives: tuple[str, ...]) -> tuple[str, int, str, str]:
    """(the report line, trials scored, the front so far, the ETA)."""
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
    eta = _duration(per_trial * left if per_trial is not None else None)
    line = (f"search: trial {len(done)} of {n_trials}; Pareto front ({len(front)}): {shown or '-'}; "
            f"{_duration(per_trial)} per trial, ETA {eta}")
    return line, len(done), f"({len(front)}) {shown}" if front else "-", eta
