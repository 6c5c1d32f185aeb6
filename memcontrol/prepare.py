"""Stage `prepare`: the dataset (embedded default, or the user's CSV + image folder) validated into
one manifest (data/processed/manifest.parquet; read back with `memcontrol.workdir.read_manifest`)."""

from __future__ import annotations

import os
from pathlib import Path

from memcontrol.config import Params
from memcontrol.data.manifest import save_manifest
from memcontrol.workdir import Layout


def prepare(params: Params, layout: Layout) -> Path:
    """Ingest and validate the dataset into the manifest (paths relative to the manifest's folder)."""
    if params.data.source == "demo":
        from memcontrol.data.demo import build_demo

        df = build_demo(layout.demo_dir, seed=params.seed, **params.data.demo.model_dump())
        df["path"] = [os.path.relpath(layout.demo_dir / x, layout.manifest.parent) for x in df["path"]]
    else:
        from memcontrol.data.manifest import ingest_csv

        csv = params.data.csv
        df = ingest_csv(
            csv.csv, csv.image_root, path_column=csv.path_column, text_column=csv.text_column,
            split_column=csv.split_column, group_column=csv.group_column, mem_csv=csv.mem_csv, n_mem=csv.n_mem,
            val_fraction=csv.val_fraction, test_fraction=csv.test_fraction, seed=params.seed,
            allow_outside_root=csv.allow_outside_root,
        )
        root = Path(csv.image_root).resolve()
        df["path"] = [x if Path(x).is_absolute() else str(root / x) for x in df["path"]]
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    save_manifest(df, layout.manifest)
    return layout.manifest

