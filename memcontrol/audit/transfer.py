"""The transfer experiment (docs/paper.md §2.4): the saved mask applied unchanged to a second
dataset of other modalities (memcontrol/data/transfer.py), against the arms of transfer.arms, with
the same base model, steps, seeds and metrics as the audit. Everything lands under transfer/."""

from __future__ import annotations

import os
from pathlib import Path

from memcontrol.audit.arms import run_arms
from memcontrol.audit.run import report
from memcontrol.audit.statistics import metrics_json
from memcontrol.base_model import base_model_path, model_resolution, point_at
from memcontrol.config import Params
from memcontrol.progress import Progress
from memcontrol.reference import reference
from memcontrol.reuse import file_digest, finished, make_key
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout, write_json
from memcontrol.errors import MissingInput


def transfer_layout(layout: Layout) -> Layout:
    return Layout(layout.root / "transfer")


def prepare_transfer(params: Params, layout: Layout) -> Layout:
    """Build the transfer dataset (once per settings), point its base at the workdir's base model and
    build its reference (index, threshold) with the same embedder. Returns the transfer layout."""
    from memcontrol.data.manifest import save_manifest
    from memcontrol.data.transfer import build_transfer

    target = transfer_layout(layout)
    settings = params.transfer
    key = make_key(("memcontrol.data.transfer", "memcontrol.reference"), params, ("metrics",), n_train=settings.n_train, n_val=settings.n_val, n_test=settings.n_test,
                   image_size=settings.image_size, seed=params.seed, base=file_digest(layout.base))
    stamp = target.root / "prepared.json"
    if finished(stamp, key) is not None and target.manifest.exists():
        return target
    data_dir = target.root / "data" / "images_root"
    df = build_transfer(data_dir, n_train=settings.n_train, n_val=settings.n_val, n_test=settings.n_test, image_size=settings.image_size,
                        seed=params.seed)
    df["path"] = [os.path.relpath(data_dir / x, target.manifest.parent) for x in df["path"]]
    save_manifest(df, target.manifest)
    point_at(target, base_model_path(layout).resolve(), model_resolution(layout))
    reference(params, target)
    write_json({"key": key}, stamp)
    return target


def run_transfer(params: Params, layout: Layout, *, progress: Progress = None, on_record=None) -> dict:
    """The saved mask (transfer.mask, default masks/selected.json) on the transfer dataset against
    the arms of transfer.arms; everything under transfer/."""
    mask_path = Path(params.transfer.mask) if params.transfer.mask else layout.selected
    if not mask_path.exists():
        raise MissingInput(f"transfer: mask {mask_path} not found (run `memcontrol search`, or set transfer.mask)")
    selected = Mask.load(mask_path)
    target = prepare_transfer(params, layout)
    steps = params.transfer.steps or params.final.steps
    out_root = target.root / "arms"
    records = run_arms(params, target, params.transfer.arms, params.transfer.seeds, out_root, selected=selected,
                       steps=steps, progress=progress, on_record=on_record)
    intro = [
        f"The mask {mask_path} (found on the chest X-ray set) applied unchanged to a second dataset of other "
        "modalities: axial slices of a real chest CT (train/test) and 12 real CT/MR/ultrasound/radiograph DICOM "
        "images as the memorization subset (memcontrol/data/transfer.py). Same base model, same steps, seeds and "
        "metrics as the audit; the memorization threshold and FAISS index are rebuilt on this dataset.",
    ]
    res = report(params, target, records, title="MemControl transfer: the saved mask on CT/MR slices",
                 out_md=target.reports / "transfer.md", out_html=target.reports / "transfer.html",
                 fig_dir=target.reports / "transfer", steps=steps, seeds=params.transfer.seeds, selected=selected,
                 threshold_file=out_root / "extraction_threshold.json", intro=intro, with_search=False)
    write_json(metrics_json(res["table"]), target.reports / "transfer_metrics.json")
    return {**res, "records": records, "metrics": target.reports / "transfer_metrics.json", "root": target.root}
