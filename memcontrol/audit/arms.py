"""Audit arms: names -> masks and mitigation hooks; one arm and seed; every arm for every seed.

Arm names are ``base[+mitigation...]`` (memcontrol.mitigations.parse_arm). Bases: ``full`` (the
whole UNet), ``selected`` (the saved mask), ``unmasked`` (the selected mask's method on the whole
UNet, at the selected LR and options, so it differs from ``selected`` by the mask alone) and any
PEFT method name (unmasked, at ``audit.method_lr``; the selected mask's own method gets the
selected LR, as ``unmasked``).

Outputs of one arm and seed (``<out>/<arm>/seed<k>/``): what `memcontrol.arms.run_arm` writes
(adapter, mask.json, metrics.json, grid.png) plus ``audit.json`` (extraction attack, hook counters)
and ``nearest.png`` (the most similar generations above their nearest training images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from memcontrol import mitigations as M
from memcontrol import tuning
from memcontrol.arms import final_rows, full_mask, run_arm
from memcontrol.audit.attack import attack_arm, tile_threshold
from memcontrol.base_model import base_model_path, model_resolution
from memcontrol.config import Params
from memcontrol.evaluate import EvalContext
from memcontrol.method_choice import options_for
from memcontrol.progress import Progress, ticker
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout
from memcontrol.errors import MissingInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    base: str
    mitigations: tuple[str, ...]
    mask: Mask


def arm_mask(params: Params, layout: Layout, base: str, selected: Mask | None) -> Mask:
    """The mask of an arm's base (see the module docstring)."""
    if base == "full":
        return full_mask(params)
    if base == "selected":
        if selected is None:
            raise MissingInput(f"arm `selected` needs a saved mask ({layout.selected}); run `memcontrol search` first")
        return selected
    if base == "unmasked" and selected is None:
        raise MissingInput(f"arm `unmasked` needs a saved mask ({layout.selected}) to know the method")
    method = selected.method if base == "unmasked" else base
    if method not in tuning.METHODS:
        raise ValueError(f"arm base {base!r}: not full, selected, unmasked or a method ({sorted(tuning.METHODS)})")
    if method == "full":
        return full_mask(params)
    if selected is not None and method == selected.method:
        lr, options = selected.lr, dict(selected.options)
    else:
        if method not in params.audit.method_lr:
            raise ValueError(f"audit.method_lr has no learning rate for method {method!r}")
        lr = params.audit.method_lr[method]
        options = options_for(method, dict(params.tuning.options), params.tuning.methods) if method in params.tuning.methods else {}
    return Mask(method=method, blocks=(), bits=(), lr=lr, mode="reference", options=options)


def build_arms(params: Params, layout: Layout, names: tuple[str, ...], selected: Mask | None) -> list[Arm]:
    arms = []
    for name in names:
        base, mits = M.parse_arm(name)
        arms.append(Arm(name, base, mits, arm_mask(params, layout, base, selected)))
    return arms


def mitigation_settings(params: Params) -> M.Settings:
    m = params.audit.mitigations
    return M.Settings(rwa_k=m.rwa_k, gn_sigma=m.gn_sigma, wen_threshold=m.wen_threshold, wen_quantile=m.wen_quantile)


def settings_used(settings: M.Settings, mitigations: tuple[str, ...]) -> dict:
    """The settings the given mitigations read (part of the arm's key: a change retrains)."""
    used = {}
    if "rwa" in mitigations:
        used["rwa_k"] = settings.rwa_k
    if "gn" in mitigations:
        used["gn_sigma"] = settings.gn_sigma
    if "wen" in mitigations:
        used["wen_threshold"], used["wen_quantile"] = settings.wen_threshold, settings.wen_quantile
    return used


class TextSide:
    """The frozen text encoder alone (RWA re-encodes captions at every use), loaded once."""

    def __init__(self, layout: Layout):
        from transformers import AutoModel, AutoTokenizer

        from memcontrol.models.bundle import Bundle

        path = base_model_path(layout)
        tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        enc = AutoModel.from_pretrained(path / "text_encoder", local_files_only=True, use_safetensors=True)
        enc.eval().requires_grad_(False)
        # Bundle.encode_prompts uses only the text encoder and tokenizer: same tokenisation as training
        self._bundle = Bundle(vae=None, unet=None, text_encoder=enc, tokenizer=tok, scheduler=None)
        self.words = M.vocabulary_words(tok)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self._bundle.encode_prompts(prompts)


def run_audit_arm(params: Params, layout: Layout, ctx: EvalContext, arm: Arm, seed: int, out_root: Path, *,
                  steps: int, threshold: float, text_side: TextSide | None = None, progress: Progress = None) -> dict:
    """Fine-tune + evaluate one arm and seed, then the extraction attack (each reused when finished).
    Returns {"arm", "seed", "dir", "key", "mask", "metrics", "info"}."""
    out = out_root / arm.name / f"seed{seed}"
    rows = final_rows(params, ctx)
    if "dedup" in arm.mitigations:
        rows = M.deduplicate(rows)
    settings = mitigation_settings(params)
    hooks = {}
    if arm.mitigations:
        needs_text = "rwa" in arm.mitigations
        if needs_text and text_side is None:
            text_side = TextSide(layout)
        hooks = M.train_hooks([m for m in arm.mitigations if m != "dedup"], settings, prompts=ctx.encoded.prompts,
                              encode=text_side.encode if needs_text else None,
                              words=text_side.words if needs_text else ())
    mitigation_key = {"mitigations": list(arm.mitigations), "settings": settings_used(settings, arm.mitigations)}
    rec = run_arm(params, layout, ctx, arm.mask, out, rows=rows, steps=steps, seed=seed, progress=progress,
                  train_hooks=hooks or None, batch_size=params.final.batch_size, extra_key=mitigation_key)
    info = rec["train_info"]
    counters = {k: v for k, v in info.items() if k not in ("n_rows", "n_distinct_images") and isinstance(v, (int, float))}
    extra = attack_arm(params, layout, ctx, out, arm_key=rec["key"], threshold=threshold, aux=mitigation_key, info=info)
    return {"arm": arm.name, "seed": seed, "dir": str(out), "key": rec["key"], "mask": rec["mask"],
            "metrics": {**rec["metrics"], **extra, **counters}, "info": info}


def run_arms(params: Params, layout: Layout, arm_names: tuple[str, ...], seeds: tuple[int, ...], out_root: Path, *,
             selected: Mask | None, steps: int, progress: Progress = None, on_record=None) -> list[dict]:
    """Every arm for every seed (seeds outermost: a partial run has every arm at seed 0 first)."""
    ctx = EvalContext(params, layout)
    arms = build_arms(params, layout, arm_names, selected)
    thr = tile_threshold(params, ctx, out_root / "extraction_threshold.json", model_resolution(layout))
    text_side = TextSide(layout) if any("rwa" in a.mitigations for a in arms) else None
    records = []
    total = len(seeds) * len(arms)
    for seed in seeds:
        for arm in arms:
            log.info("audit arm %s seed %d", arm.name, seed)
            ticker(progress, "audit: arm-seeds")(len(records), total)

            def labelled(label: str, done: int, n: int, name=f"{arm.name} seed{seed}: ") -> None:
                progress(name + label, done, n)

            rec = run_audit_arm(params, layout, ctx, arm, seed, out_root, steps=steps, threshold=thr,
                                text_side=text_side, progress=labelled if progress is not None else None)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
    ticker(progress, "audit: arm-seeds")(len(records), total)
    return records
