"""Stage `base`: the model every arm starts from.

Real path: check that the user's diffusers folder (`model.path`) loads and point at it from
`models/base/source.json`. Embedded default: pretrain the tiny Stable-Diffusion-architecture model
on the manifest's `base` split (never fine-tuned on) and save it as a diffusers folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from memcontrol.config import Params
from memcontrol.data.images import load_images
from memcontrol.encode import encode_manifest, image_paths
from memcontrol.models import pretrained, tiny
from memcontrol.models.bundle import Bundle, ModelError, load_bundle, save_bundle
from memcontrol.models.pretrain import fit_scaling_factor, pretrain_vae
from memcontrol.progress import Progress, ticker
from memcontrol.report import image_grid, save_image
from memcontrol.sample import generate, item_seed
from memcontrol.train import finetune
from memcontrol.tuning import block_layout
from memcontrol.workdir import Layout, read_manifest, rows_of, write_json

log = logging.getLogger(__name__)

def point_at(layout: Layout, model_path: Path | str, resolution: int) -> Path:
    """Make `layout.base` refer to a diffusers folder elsewhere (no copy of the weights)."""
    return write_json({"path": str(model_path), "resolution": resolution}, layout.base / "source.json")


def base_model_path(layout: Layout) -> Path:
    """The diffusers folder of the base model: the user's folder, or models/base itself."""
    src = layout.base / "source.json"
    return Path(json.loads(src.read_text())["path"]) if src.exists() else layout.base


def model_resolution(layout: Layout) -> int:
    """The base model's image size, from its configs (no weights loaded)."""
    src = layout.base / "source.json"
    if src.exists():
        return int(json.loads(src.read_text())["resolution"])
    unet = json.loads((layout.base / "unet" / "config.json").read_text())
    vae = json.loads((layout.base / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def pretrain(params: Params, layout: Layout, rows, progress: Progress = None) -> Bundle:
    """Pretrain the tiny model on the manifest's base rows (minutes on 2 cores)."""
    cfg, bt = params.model.tiny, params.model.base_train
    torch.manual_seed(params.seed)
    bundle = tiny.build(cfg, seed=params.seed)
    # The VAE is a general codec (every base row); the UNet, the generative prior, learns the base
    # world only (subset "", not the "codec" rows): fine-tuning then has a domain to learn.
    images = load_images(image_paths(rows, layout.manifest.parent), cfg.resolution)
    pretrain_vae(bundle.vae, images, steps=bt.vae_steps, lr=bt.vae_lr, batch_size=bt.batch_size,
                 kl_weight=bt.vae_kl_weight, seed=params.seed,
                 progress=lambda step, _loss: ticker(progress, "base: VAE")(step, bt.vae_steps))
    bundle.vae.register_to_config(scaling_factor=fit_scaling_factor(bundle.vae, images))
    unet_rows = rows[rows["subset"] == ""].reset_index(drop=True)
    encoded = encode_manifest(bundle, unet_rows, layout.manifest.parent)
    unet = bundle.unet
    finetune(unet, [{"params": list(unet.parameters()), "lr": bt.unet_lr, "name": "unet"}],
             encoded.train_data(unet_rows), bundle.scheduler, steps=bt.unet_steps, batch_size=bt.batch_size,
             seed=params.seed, cfg_dropout=0.1, device=params.train.device,
             progress=lambda step, _loss: ticker(progress, "base: UNet")(step, bt.unet_steps))
    unet.to("cpu").requires_grad_(False)
    return bundle


def base(params: Params, layout: Layout, progress: Progress = None, *, force_pretrain: bool = False) -> Path:
    """Point at the user's model, or bring up the tiny one: the committed copy when its recipe
    matches (memcontrol/models/pretrained.py), else pretrain. Also draws a sample grid of it."""
    if params.model.path is not None:
        bundle = load_bundle(params.model.path)
        layout.base.mkdir(parents=True, exist_ok=True)
        point_at(layout, Path(params.model.path).resolve(), bundle.resolution)
        return layout.base
    df = read_manifest(layout)
    rows = rows_of(df, "base")
    if rows.empty:
        raise ModelError(f"{layout.manifest}: no `base` rows to pretrain the tiny model on (set model.path for a real model)")
    key = pretrained.recipe(params, rows)
    if not force_pretrain and pretrained.committed_recipe() == key:
        bundle, source = pretrained.load_committed(params), "committed"
    else:
        t0 = time.perf_counter()
        bundle, source = pretrain(params, layout, rows, progress), "pretrained"
        log.info("base: pretrained the tiny model in %.0f s", time.perf_counter() - t0)
    save_bundle(bundle, layout.base)
    write_json({"recipe": key, "source": source}, layout.base / "recipe.json")
    # A sample grid of the base model on held-out prompts of the fine-tuning domain.
    test = rows_of(df, "test").head(16)
    text = bundle.encode_prompts(test["prompt"].tolist())
    imgs = generate(bundle, text, [item_seed(params.sample.seed, i, 0) for i in range(len(test))],
                    steps=params.sample.steps, guidance=params.sample.guidance)
    layout.reports.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(imgs, cols=8, scale=2), layout.reports / "base_samples.png")
    return layout.base


def load_base(layout: Layout, device: str = "cpu") -> Bundle:
    return load_bundle(base_model_path(layout)).to(device)


def block_list(params: Params, layout: Layout, method: str | None = None) -> tuple[str, ...]:
    """The search space's blocks: one bit per block of the base UNet for this method and mode."""
    return block_layout(load_base(layout).unet, method or params.tuning.methods[0], params.tuning.mode,
                        params.tuning.granularity)
