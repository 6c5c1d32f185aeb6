"""The 17 real radiographs that ship in installed packages (16 pediatric chest X-rays of Kermany et
al. 2018 in pneumonia-model-package, the adult PA chest CR "RG1" in pydicom-data), with their label
and patient id: the tests' stand-in for a user's own image folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memcontrol import assets


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
