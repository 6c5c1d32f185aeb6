"""The progress callback every long library step accepts: (label, done, total). The library only
calls it; tasks/progress.py draws it as rich progress bars."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None] | None


def ticker(progress: Progress, label: str) -> Callable[[int, int], None]:
    """A (done, total) callback reporting under `label` (nothing when `progress` is None)."""
    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(label, done, total)
    return tick
