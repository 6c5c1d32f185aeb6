"""The embedded default's tiny base model, pretrained once and committed with its recipe.

Pretraining it (`memcontrol.base_model.pretrain`) takes minutes on 2 cores, so the repository
carries the result: `pretrained/tiny-base/` holds the VAE and UNet as diffusers folders (safetensors,
fp16 to halve the size; loaded back as fp32) and `recipe.json`, the key it was trained under. The
key covers every setting that shapes the weights: `model.tiny`, `model.base_train`, the seed and a
digest of the base rows' images (their sha256s), so the copy is used only when pretraining again
would start from the same data and settings. Anything else pretrains. `memcontrol base --pretrain`
always pretrains, and `python scripts/pretrain_base.py` refreshes the committed copy.
`RECIPE_VERSION` is bumped when the pretraining code changes what it computes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from memcontrol import atomic
from memcontrol.config import Params
from memcontrol.models import tiny
from memcontrol.models.bundle import Bundle

RECIPE_VERSION = 1
COMMITTED = Path(__file__).parent / "pretrained" / "tiny-base"


def recipe(params: Params, base_rows: pd.DataFrame) -> dict:
    """What the tiny base model's weights depend on (the committed copy's key)."""
    images = hashlib.sha256("\n".join(f"{s}:{sub}" for s, sub in zip(base_rows["sha256"], base_rows["subset"])).encode())
    return {"version": RECIPE_VERSION, "seed": params.seed, "tiny": params.model.tiny.model_dump(mode="json"),
            "base_train": params.model.base_train.model_dump(mode="json"), "base_images": images.hexdigest()}


def committed_recipe() -> dict | None:
    path = COMMITTED / "recipe.json"
    return json.loads(path.read_text())["recipe"] if path.exists() else None


def load_committed(params: Params) -> Bundle:
    """The committed VAE and UNet (as fp32) around the packaged text encoder."""
    bundle = tiny.build(params.model.tiny, seed=params.seed)
    bundle.vae = AutoencoderKL.from_pretrained(COMMITTED / "vae", torch_dtype=torch.float32, use_safetensors=True)
    bundle.unet = UNet2DConditionModel.from_pretrained(COMMITTED / "unet", torch_dtype=torch.float32,
                                                       use_safetensors=True)
    for module in (bundle.vae, bundle.unet):
        module.eval().requires_grad_(False)
    return bundle


def save_committed(bundle: Bundle, key: dict, info: dict) -> Path:
    """Write the VAE and UNet (fp16) and recipe.json under `COMMITTED` (maintainers refresh it)."""
    COMMITTED.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", bundle.vae), ("unet", bundle.unet)):
        with atomic.atomic_dir(COMMITTED / name) as tmp:
            copy.deepcopy(module).half().save_pretrained(tmp, safe_serialization=True)
    atomic.write_text(COMMITTED / "recipe.json", json.dumps({"recipe": key, **info}, indent=2, sort_keys=True) + "\n")
    return COMMITTED
