"""The dataset manifest: one row per image, with its prompt, split and memorization subset.

Columns (all strings, see COLUMNS):
    id      unique row id
    path    image file, relative to the manifest's folder (demo) or absolute (user dataset)
    prompt  the text condition, whitespace-normalised, never empty
    split   "base" (only for pretraining the tiny base model), "train" or "test"
    subset  train rows: "mem" (the memorization subset) or "original"; "" for base/test rows
    label   a short finding tag ("normal", "consolidation_rll", ...), "" if unknown
    source  provenance tag ("drr+iu", "kermany2018+iu", "user", ...)
    sha256  of the image file's bytes

`ingest_csv` turns a MIMIC-CXR-style folder + CSV (path, text) into a manifest, `save_manifest` /
`load_manifest` store it as parquet, and `memorization_training_set` builds the memorization-
inducing fine-tuning set of the reference (docs/paper.md §2.2).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from memcontrol.data.errors import DataError
from memcontrol.data.images import DICOM_SUFFIXES, check_readable, write_atomic

LOG = logging.getLogger(__name__)

COLUMNS = ["id", "path", "prompt", "split", "subset", "label", "source", "sha256"]
SPLITS = ("base", "train", "test")
SUBSETS = ("mem", "original")

__all__ = [
    "COLUMNS", "SPLITS", "SUBSETS", "DataError", "ingest_csv", "save_manifest", "load_manifest",
    "validate_manifest", "image_paths", "digest", "memorization_training_set",
]


def normalize_prompt(text) -> str:
    """Collapse whitespace; NaN/None -> ""."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    return " ".join(str(text).split())


def validate_manifest(df: pd.DataFrame, where: str = "manifest") -> pd.DataFrame:
    """Check the schema and the split/subset rules; returns df[COLUMNS] (a copy) or raises
    DataError naming `where`, the column and the row (1-based data row) at fault."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")
    out = df[COLUMNS].reset_index(drop=True).copy()
    for c in COLUMNS:
        bad = [i for i, v in enumerate(out[c]) if not isinstance(v, str)]
        if bad:
            raise DataError(f"{where}: column {c!r} row {bad[0] + 1}: expected a string, got {out[c][bad[0]]!r}")
    for col in ("id", "path", "prompt", "sha256"):
        empty = np.flatnonzero(out[col].str.strip() == "")
        if len(empty):
            raise DataError(f"{where}: column {col!r} row {empty[0] + 1} (id {out['id'][empty[0]]!r}) is empty")
    dup = out["id"].duplicated(keep=False)
    if dup.any():
        rows = (np.flatnonzero(dup) + 1).tolist()
        raise DataError(f"{where}: duplicated id {out['id'][dup].iloc[0]!r} in rows {rows[:10]}")
    bad = np.flatnonzero(~out["split"].isin(SPLITS))
    if len(bad):
        i = bad[0]
        raise DataError(f"{where}: column 'split' row {i + 1}: {out['split'][i]!r} is not one of {SPLITS}")
    is_train = out["split"] == "train"
    bad = np.flatnonzero((is_train & ~out["subset"].isin(SUBSETS)) | (~is_train & (out["subset"] != "")))
    if len(bad):
        i = bad[0]
        raise DataError(f"{where}: column 'subset' row {i + 1}: {out['subset'][i]!r} is not valid for split "
                        f"{out['split'][i]!r} (train: {SUBSETS}; base/test: '')")
    bad = np.flatnonzero(~out["sha256"].str.fullmatch(r"[0-9a-f]{64}"))
    if len(bad):
        raise DataError(f"{where}: column 'sha256' row {bad[0] + 1}: {out['sha256'][bad[0]]!r} is not a sha256 hex digest")
    return out


def _sha256_checked(path: Path) -> str:
    """sha256 of the file's bytes, after checking PIL (or pydicom) can parse them."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        check_readable(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return hashlib.sha256(data).hexdigest()


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse as CSV ({type(e).__name__}: {e})") from e


def _require(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def ingest_csv(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    path_column: str = "path",
    text_column: str = "text",
    split_column: str | None = None,
    label_column: str | None = None,
    mem_csv: str | os.PathLike | None = None,
    n_mem: int = 16,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Validate an image folder + CSV (MIMIC-CXR style: one row per image with `path`, `text`) and
    return its manifest. Reads the CSV(s) and the images, writes nothing.

    Paths in the CSV are relative to `image_root` (or absolute); the manifest stores them absolute.
    Without `split_column`, a seeded random `test_fraction` of rows becomes "test" and the rest
    "train". The memorization subset is the rows listed in `mem_csv` (same path column; they must
    be train rows, and a text column there must agree) or else `n_mem` seeded random train rows.
    Every problem raises DataError naming the file and the CSV row (header = row 1) or column.
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image root folder not found")
    df = _read_csv(csv_path)
    needed = [path_column, text_column] + [c for c in (split_column, label_column) if c]
    _require(df, csv_path, needed)
    if len(df) == 0:
        raise DataError(f"{csv_path}: no data rows")

    def row(i: int) -> str:  # the row number a spreadsheet shows; header is row 1
        return f"{csv_path} row {i + 2}"

    rel = [str(p).strip() for p in df[path_column]]
    for i, p in enumerate(rel):
        if not p:
            raise DataError(f"{row(i)}: column {path_column!r} is empty")
    prompts = [normalize_prompt(t) for t in df[text_column]]
    for i, t in enumerate(prompts):
        if not t:
            raise DataError(f"{row(i)}: column {text_column!r} (prompt) is empty")
    keys = [os.path.normpath(p) for p in rel]
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise DataError(f"{row(i)}: path {rel[i]!r} duplicates {row(seen[k])}")
        seen[k] = i

    n = len(df)
    if split_column:
        split = [str(s).strip() for s in df[split_column]]
        for i, s in enumerate(split):
            if s not in SPLITS:
                raise DataError(f"{row(i)}: column {split_column!r} value {s!r} is not one of {SPLITS}")
    else:
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = int(round(n * test_fraction))
        if n_test < 1 or n - n_test < 1:
            raise DataError(f"{csv_path}: {n} rows with test_fraction={test_fraction} leave "
                            f"{n - n_test} train and {n_test} test rows; need at least one of each")
        split = ["train"] * n
        for i in np.random.default_rng(seed).permutation(n)[:n_test]:
            split[int(i)] = "test"
    train_idx = [i for i, s in enumerate(split) if s == "train"]

    # memorization subset
    mem = set()
    if mem_csv is not None:
        mem_csv = Path(mem_csv)
        mdf = _read_csv(mem_csv)
        _require(mdf, mem_csv, [path_column])
        for j, p in enumerate(mdf[path_column]):
            k = os.path.normpath(str(p).strip())
            i = seen.get(k)
            where = f"{mem_csv} row {j + 2}"
            if i is None:
                raise DataError(f"{where}: path {p!r} is not in {csv_path}")
            if split[i] != "train":
                raise DataError(f"{where}: path {p!r} is in split {split[i]!r}; the memorization subset must be train rows")
            if i in mem:
                raise DataError(f"{where}: path {p!r} is listed twice")
            if text_column in mdf.columns and normalize_prompt(mdf[text_column][j]) != prompts[i]:
                raise DataError(f"{where}: column {text_column!r} differs from {row(i)}")
            mem.add(i)
    else:
        if n_mem < 0 or n_mem > len(train_idx):
            raise DataError(f"{csv_path}: n_mem={n_mem} but there are {len(train_idx)} train rows")
        rng = np.random.default_rng([seed, 1])
        mem = {train_idx[int(j)] for j in rng.permutation(len(train_idx))[:n_mem]}

    # images last: the slow part
    abs_paths, hashes = [], []
    for i, p in enumerate(rel):
        f = Path(p) if Path(p).is_absolute() else image_root / p
        if not f.is_file():
            raise DataError(f"{row(i)}: image {f} not found")
        try:
            hashes.append(_sha256_checked(f))
        except DataError as e:
            raise DataError(f"{row(i)}: {e}") from e
        abs_paths.append(str(f.resolve()))

    out = pd.DataFrame({
        "id": rel,
        "path": abs_paths,
        "prompt": prompts,
        "split": split,
        "subset": ["" if s != "train" else ("mem" if i in mem else "original") for i, s in enumerate(split)],
        "label": [str(v).strip() for v in df[label_column]] if label_column else [""] * n,
        "source": ["user"] * n,
        "sha256": hashes,
    })
    LOG.info("ingested %s: %d rows (%d train, %d mem, %d test)", csv_path, n, len(train_idx), len(mem),
             sum(s == "test" for s in split))
    return validate_manifest(out, where=str(csv_path))


def save_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write the manifest as parquet, atomically (temporary file + os.replace)."""
    path = Path(path)
    df = validate_manifest(df, where=str(path))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    write_atomic(buf.getvalue(), path)
    return path


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest written by `save_manifest` and validate its schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e
    return validate_manifest(df, where=str(path))


def image_paths(manifest: pd.DataFrame, root: str | os.PathLike) -> list[Path]:
    """Absolute image paths: relative `path` values are joined to `root` (the manifest's folder)."""
    root = Path(root)
    return [Path(p) if Path(p).is_absolute() else root / p for p in manifest["path"]]


def digest(manifest: pd.DataFrame) -> str:
    """sha256 over the manifest's content (row order included): a cache key for the data."""
    df = validate_manifest(manifest)
    h = hashlib.sha256()
    for rec in df.itertuples(index=False):
        h.update(json.dumps(list(rec), ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def memorization_training_set(
    manifest: pd.DataFrame, *, data_size_ratio: float, n_repeats: int, seed: int
) -> pd.DataFrame:
    """The memorization-inducing fine-tuning set (docs/paper.md §2.2).

    A seeded random `int(n_original * data_size_ratio)` of the train rows with subset "original",
    followed by the "mem" rows repeated `n_repeats` times (the duplication induces memorization).
    Returns rows with COLUMNS, index reset; deterministic given `seed`.
    """
    df = validate_manifest(manifest)
    if not 0.0 <= data_size_ratio <= 1.0:
        raise DataError(f"data_size_ratio must be in [0, 1], got {data_size_ratio}")
    if n_repeats < 1:
        raise DataError(f"n_repeats must be >= 1, got {n_repeats}")
    train = df[df["split"] == "train"]
    original = train[train["subset"] == "original"].reset_index(drop=True)
    mem = train[train["subset"] == "mem"].reset_index(drop=True)
    if len(mem) == 0:
        raise DataError("manifest has no train rows with subset 'mem' to repeat")
    k = int(len(original) * data_size_ratio)
    pick = np.random.default_rng(seed).choice(len(original), size=k, replace=False)
    return pd.concat([original.iloc[np.sort(pick)]] + [mem] * n_repeats, ignore_index=True)
