"""The working directory: where every stage reads and writes (`Layout`), how it writes, and the
manifest every stage reads.

Every output goes through memcontrol/atomic.py (a unique temp name in its folder, fsync, rename),
so a crash or kill never leaves half a file, and a file that exists is complete."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol import atomic
from memcontrol.data.manifest import load_manifest


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to the working directory `root`
    (docs/architecture.md draws which stage writes which)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "processed" / "manifest.parquet"

    @property
    def demo_dir(self) -> Path:
        return self.root / "data" / "demo"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def reference(self) -> Path:
        return self.root / "data" / "reference"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def study_db(self) -> Path:
        return self.search / "study.db"

    @property
    def trials(self) -> Path:
        return self.search / "trials"

    @property
    def selected(self) -> Path:
        return self.root / "masks" / "selected.json"

    @property
    def selected_info(self) -> Path:
        return self.root / "masks" / "selected_info.json"

    @property
    def final(self) -> Path:
        return self.root / "models" / "final"

    @property
    def full(self) -> Path:
        return self.root / "models" / "full"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def read_manifest(layout: Layout) -> pd.DataFrame:
    """The dataset's manifest (one row per image: id, path, prompt, split, subset, source, sha256)."""
    return load_manifest(layout.manifest)


def rows_of(df: pd.DataFrame, split: str, subset: str | None = None) -> pd.DataFrame:
    """The manifest rows of one split (base/train/test), optionally of one subset (original/mem)."""
    selected = df["split"] == split
    if subset is not None:
        selected &= df["subset"] == subset
    return df[selected].reset_index(drop=True)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def to_json(obj) -> str:
    """Sorted-key, indented JSON; numpy scalars/arrays and paths become plain values."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)


def write_text(text: str, path: Path) -> Path:
    return atomic.write_text(path, text)


def write_json(obj, path: Path) -> Path:
    return write_text(to_json(obj), path)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
