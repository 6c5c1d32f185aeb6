"""The embedded demo dataset: real chest X-rays for the memorization subset, simulated radiographs
(DRRs of one real CT) for everything else, each with a report-style prompt that states what the
image shows. Everything is read from installed packages at run time (docs/data.md).

* memorization subset (train, subset "mem"): the 16 real pediatric CXRs of Kermany et al. 2018
  (pneumonia-model-package) and the real adult PA chest CR "RG1" (pydicom-data), each paired with
  a distinct real IU report that agrees with its label; `n_real_test` of them go to the test split.
* train "original", test and base rows: DRRs with mask-driven findings (`drr.py`) and prompts of
  real IU sentences (`reports.py`). Base, train and test DRRs come from separate random streams.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol import assets
from memcontrol.data import drr, reports
from memcontrol.data.images import encode_png, read_image, resize_crop, write_atomic
from memcontrol.data.manifest import COLUMNS, validate_manifest

LOG = logging.getLogger(__name__)

# DRR finding mix: (kind, where, weight)
DRR_MIX = (
    [("normal", "", 0.40)]
    + [("consolidation", lobe, 0.05) for lobe in drr.LOBES]
    + [("effusion", side, 0.075) for side in ("right", "left")]
    + [("cardiomegaly", "", 0.10)]
    + [("nodule", lobe, 0.02) for lobe in drr.LOBES]
)
_SPLIT_STREAM = {"base": 1, "train": 2, "test": 3}  # separate random streams: no image shared
N_REAL = 17


def drr_label(kind: str, where: str) -> str:
    """Manifest label of a DRR finding: "normal", "cardiomegaly", "consolidation_rll", "effusion_left"..."""
    return f"{kind}_{where}" if where else kind


@dataclass(frozen=True)
class RealImage:
    id: str
    file: Path
    label: str     # "normal", "pneumonia" or "nodules"
    patient: str
    source: str


def real_images() -> list[RealImage]:
    """The 17 real radiographs, in a fixed order."""
    out = []
    for f in assets.pediatric_cxrs():
        name = f.stem
        if name.startswith("NORMAL"):
            label, patient = "normal", re.search(r"IM-\d+", name).group(0)
        elif "bacteria" in name:
            label, patient = "pneumonia", name.split("_")[0]
        else:
            raise ValueError(f"{f}: cannot tell normal from pneumonia by its file name")
        out.append(RealImage(f"kermany-{name}", f, label, patient, "kermany2018"))
    # RG1 shows multiple round pulmonary masses (metastasis-like), hence "nodules"
    out.append(RealImage("pydicom-rg1", assets.adult_cxr_dicom(), "nodules", "rg1", "pydicom-rg1"))
    return out


def _choose_real_test(images: list[RealImage], n_real_test: int, rng: np.random.Generator) -> set[str]:
    """Balanced normal/pneumonia test images; only patients with a single image, so no patient
    has images in both train and test."""
    if n_real_test % 2 or n_real_test < 0:
        raise ValueError(f"n_real_test must be even and >= 0 (half normal, half pneumonia), got {n_real_test}")
    chosen = set()
    for label in ("normal", "pneumonia"):
        per_patient: dict[str, list[RealImage]] = {}
        for im in images:
            if im.label == label:
                per_patient.setdefault(im.patient, []).append(im)
        singles = sorted(v[0].id for v in per_patient.values() if len(v) == 1)
        k = n_real_test // 2
        # keep at least one of each label in the memorization subset
        if k > len(singles) or k >= sum(im.label == label for im in images):
            raise ValueError(f"n_real_test={n_real_test}: at most {2 * min(len(singles), 7)} real images can go to test")
        chosen.update(singles[int(i)] for i in rng.permutation(len(singles))[:k])
    return chosen


def _png(img: np.ndarray, path: Path) -> str:
    data = encode_png(img)
    write_atomic(data, path)
    return hashlib.sha256(data).hexdigest()


def build_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_base: int = 600,
    n_train: int = 400,
    n_test: int = 150,
    image_size: int = 128,
    n_real_test: int = 4,
) -> pd.DataFrame:
    """Write the demo images to `out_dir/images/` (PNG, image_size x image_size, 8-bit grayscale) and
    return the manifest (paths relative to out_dir). Deterministic given `seed`.

    n_train and n_test count all rows of that split: train = (17 - n_real_test) real "mem" rows +
    DRR "original" rows; test = n_real_test real rows + DRRs; base = n_base DRRs.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    n_real_train = N_REAL - n_real_test
    if n_base < 0 or n_train < n_real_train or n_test < n_real_test or image_size < 16:
        raise ValueError(
            f"build_demo: need n_base >= 0, n_train >= {n_real_train} (real train images), "
            f"n_test >= n_real_test={n_real_test}, image_size >= 16; got n_base={n_base}, "
            f"n_train={n_train}, n_test={n_test}, image_size={image_size}")
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []

    # --- real images + distinct real reports
    iu = reports.load_iu_reports()
    reals = real_images()
    test_ids = _choose_real_test(reals, n_real_test, np.random.default_rng([seed, 10]))
    pools = {}
    for label in reports.REAL_LABELS:
        cands = reports.report_candidates(iu, label)
        order = np.random.default_rng([seed, 11, reports.REAL_LABELS.index(label)]).permutation(len(cands))
        pools[label] = [cands[int(i)] for i in order]
    used = set()
    for im in reals:
        if not pools[im.label]:
            raise ValueError(f"no unused IU report agrees with label {im.label!r} (needed for {im.file})")
        rep, text = pools[im.label].pop(0)
        used.add(rep.uid)
        rel = f"images/{im.id}.png"
        sha = _png(resize_crop(read_image(im.file), image_size), out_dir / rel)
        split = "test" if im.id in test_ids else "train"
        rows.append(dict(id=im.id, path=rel, prompt=text, split=split,
                         subset="mem" if split == "train" else "", label=im.label,
                         source=f"{im.source}+iu:{rep.uid}", sha256=sha))
    t_real = time.perf_counter() - t0

    # --- DRRs
    bank = reports.sentence_bank(iu, frozenset(used), frozenset(r["prompt"] for r in rows))
    # 2.8 mm voxels up to 160 px, 1.4 mm above (full resolution would need ~2.5 GB)
    phantom = drr.load_phantom(xy_factor=4 if image_size <= 160 else 2)
    weights = np.array([w for _, _, w in DRR_MIX])
    weights /= weights.sum()
    counts = {"base": n_base, "train": n_train - n_real_train, "test": n_test - n_real_test}
    for split in ("base", "train", "test"):
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, _SPLIT_STREAM[split], i])
            kind, where, _ = DRR_MIX[int(rng.choice(len(DRR_MIX), p=weights))]
            prompt, finding, real = reports.drr_prompt(kind, where, bank, rng)
            img = drr.render(phantom, finding, rng, image_size)
            rel = f"images/drr-{split}-{i:05d}.png"
            rows.append(dict(id=f"drr-{split}-{i:05d}", path=rel, prompt=prompt, split=split,
                             subset="original" if split == "train" else "", label=drr_label(kind, where),
                             source="drr+iu" if real else "drr+template", sha256=_png(img, out_dir / rel)))

    order = {"base": 0, "train": 1, "test": 2}
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.sort_values("split", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    df = validate_manifest(df, where=str(out_dir))
    dup = df["sha256"].duplicated(keep=False)
    if dup.any():  # would mean two identical images: a bug in the streams above
        raise RuntimeError(f"build_demo: identical images {df.loc[dup, 'id'].tolist()[:6]}")
    LOG.info("demo data: %d base, %d train (%d mem), %d test images in %s; real images %.1fs, total %.1fs",
             counts["base"], n_train, n_real_train, n_test, img_dir, t_real, time.perf_counter() - t0)
    return df
