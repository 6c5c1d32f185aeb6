"""Rich progress bars for long steps, fed by the library's (label, done, total) callbacks."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def bars():
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    ) as prog:
        ids: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in ids:
                ids[label] = prog.add_task(label, total=total)
            prog.update(ids[label], completed=done, total=total)
            if done >= total:
                prog.remove_task(ids.pop(label))

        yield update
