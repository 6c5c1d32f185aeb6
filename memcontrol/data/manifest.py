"""The dataset manifest: one row per image, with its prompt, split and memorization subset.

Columns (all strings, see COLUMNS):
    id      unique row id
    path    image file, relative to the manifest's folder (demo) or absolute (user dataset)
    prompt  the text condition, whitespace-normalised, never empty
    split   "base" (only for pretraining the tiny base model), "train", "val" (what the search scores
            on) or "test" (Stage 2 and every reported number; the search never sees it)
    subset  train rows: "mem" (the memorization subset) or "original"; base rows: "" or "codec"
            (images that pretrain the VAE only); "" for val/test rows
    label   a short finding tag ("normal", "consolidation_rll", ...), "" if unknown
    source  provenance tag ("drr+iu", "ct-axial", "user", ...)
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

from memcontrol import atomic
from memcontrol.data.errors import DataError
from memcontrol.data.images import DICOM_SUFFIXES, check_readable
from memcontrol.data.paths import image_file

LOG = logging.getLogger(__name__)

COLUMNS = ["id", "path", "prompt", "split", "subset", "label", "source", "sha256"]
SPLITS = ("base", "train", "val", "test")
USER_SPLITS = ("train", "val", "test")  # "base" only pretrains the embedded default's tiny model
SUBSETS = ("mem", "original")
# base rows of subset "codec" pretrain the VAE only, never the UNet (the embedded default's base)
SUBSETS_OF = {"train": SUBSETS, "base": ("", "codec"), "val": ("",), "test": ("",)}

__all__ = [
    "COLUMNS", "SPLITS", "SUBSETS", "USER_SPLITS", "split_by_group", "DataError", "ingest_csv", "save_manifest", "load_manifest",
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
    allowed = out["split"].map(lambda split: SUBSETS_OF.get(split, ("",)))
    bad = np.flatnonzero([subset not in ok for subset, ok in zip(out["subset"], allowed)])
    if len(bad):
        i = bad[0]
        raise DataError(f"{where}: column 'subset' row {i + 1}: {out['subset'][i]!r} is not valid for split "
                        f"{out['split'][i]!r} (train: {SUBSETS}; base: '' or 'codec'; val/test: '')")
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
        why = str(e).replace(" <_io.BytesIO object", "").split(" at 0x")[0]  # PIL names the buffer, not the file
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {why})") from e
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
    group_column: str | None = None,
    label_column: str | None = None,
    mem_csv: str | os.PathLike | None = None,
    n_mem: int = 16,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Validate an image folder + CSV (MIMIC-CXR style: one row per image with `path`, `text`) and
    return its manifest. Reads the CSV(s) and the images, writes nothing.

    Paths in the CSV are relative to `image_root` and must stay inside it (no absolute path, `..`
    or symlink out of it) unless `allow_outside_root`; the manifest stores them absolute.
    Three splits: the search scores on "val", Stage 2 and every reported number on "test", which
    the search never sees. Without `split_column`, seeded random shares `val_fraction` and
    `test_fraction` become "val" and "test", the rest "train". With `group_column` (a patient id)
    whole groups are assigned, so no patient has images in two splits; without it images of one
    patient can land on both sides, which inflates held-out similarity and so the memorization
    threshold (a warning says so). The memorization subset is the rows listed in `mem_csv` (same path column; they must
    be train rows, and a text column there must agree) or else `n_mem` seeded random train rows.
    Every problem raises DataError naming the file and the CSV row (header = row 1) or column.
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image root folder not found")
    df = _read_csv(csv_path)
    needed = [path_column, text_column] + [c for c in (split_column, group_column, label_column) if c]
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
    groups = None
    if group_column:
        groups = [str(g).strip() for g in df[group_column]]
        for i, g in enumerate(groups):
            if not g:
                raise DataError(f"{row(i)}: column {group_column!r} (group / patient id) is empty")
    if split_column:
        split = [str(s).strip() for s in df[split_column]]
        for i, s in enumerate(split):
            if s not in USER_SPLITS:
                raise DataError(f"{row(i)}: column {split_column!r} value {s!r} is not one of {USER_SPLITS}")
        for need in USER_SPLITS:
            if need not in split:
                raise DataError(f"{csv_path}: column {split_column!r} has no {need!r} row; the search scores on "
                                "'val' and every reported number uses 'test', so all three splits are needed")
        if groups is not None:
            first: dict[str, int] = {}
            for i, g in enumerate(groups):
                j = first.setdefault(g, i)
                if split[j] != split[i]:
                    raise DataError(f"{row(i)}: group {g!r} (column {group_column!r}) is in split {split[i]!r} "
                                    f"but {row(j)} puts it in {split[j]!r}; a group must stay in one split")
    else:
        split = split_by_group(groups if groups is not None else [str(i) for i in range(n)],
                               val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, where=str(csv_path))
    if groups is None:
        LOG.warning("%s: no group column (patient id): images of one patient may land in both train and "
                    "val/test, which inflates held-out similarity and so biases the memorization threshold "
                    "and floor upwards; set data.csv.group_column", csv_path)
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
        f = image_file(p, image_root, row(i), allow_outside_root=allow_outside_root)
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
    LOG.info("ingested %s: %d rows (%d train, %d mem, %d val, %d test)", csv_path, n, len(train_idx), len(mem),
             split.count("val"), split.count("test"))
    return validate_manifest(out, where=str(csv_path))


def split_by_group(groups: list[str], *, val_fraction: float, test_fraction: float, seed: int,
                   where: str = "dataset") -> list[str]:
    """Assign whole groups (patients) to "test", "val" and "train", in a seeded random order of the
    groups, until each held-out split holds its share of the rows (rounded, at least one; a group is
    never cut, so a split can hold a few more). Returns one split per row."""
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                        "and sum to less than 1")
    n = len(groups)
    rows_of: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows_of.setdefault(g, []).append(i)
    order = [list(rows_of)[int(k)] for k in np.random.default_rng([seed, 2]).permutation(len(rows_of))]
    split = ["train"] * n
    want = {"test": max(1, round(test_fraction * n)), "val": max(1, round(val_fraction * n))}
    got = {"test": 0, "val": 0}
    for g in order:
        target = next((s for s in ("test", "val") if got[s] < want[s]), None)
        if target is None:
            break
        for i in rows_of[g]:
            split[i] = target
        got[target] += len(rows_of[g])
    counts = {s: split.count(s) for s in USER_SPLITS}
    if min(counts.values()) < 1:
        raise DataError(f"{where}: {n} rows in {len(rows_of)} groups with val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction} give {counts}; need at least one row in each split")
    return split


def save_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write the manifest as parquet, atomically (memcontrol.atomic)."""
    path = Path(path)
    df = validate_manifest(df, where=str(path))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic.write_bytes(path, buf.getvalue())
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
