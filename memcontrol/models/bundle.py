"""A Stable-Diffusion-style bundle (VAE, UNet, text encoder, tokenizer, scheduler) in and out
of a diffusers folder, the same layout `StableDiffusionPipeline.from_pretrained` reads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

from memcontrol import atomic
from memcontrol.errors import UserError

log = logging.getLogger(__name__)

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class ModelError(UserError, ValueError):
    """A model folder is missing a component or has an unusable one."""


@dataclass
class Bundle:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DDPMScheduler

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """prompts (n,) -> text states (n, L, D) float32, L = tokenizer.model_max_length.

        Same tokenisation and masking as StableDiffusionPipeline.encode_prompt, so a folder
        sampled by diffusers sees the same conditioning as our own sampler."""
        device = next(self.text_encoder.parameters()).device
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        out = []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(
                list(prompts[i : i + batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = tok.attention_mask.to(device) if use_mask else None
            out.append(self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """images (n, 3, H, W) in [-1, 1] -> latent mean and std (n, c, H/s, W/s) float32, contiguous,
        already scaled by the VAE scaling factor; training samples mean + std * eps each step as SD does."""
        device = next(self.vae.parameters()).device
        means, stds = [], []
        for i in range(0, len(images), batch_size):
            dist = self.vae.encode(images[i : i + batch_size].to(device)).latent_dist
            means.append(dist.mean.cpu() * self.latent_scale)
            stds.append(dist.std.cpu() * self.latent_scale)
        # contiguous: the VAE leaves channels_last latents for batches > 1, and
        # torch 2.13 CPU segfaults in GroupNorm's backward on channels_last input (trainable norms).
        return torch.cat(means).contiguous(), torch.cat(stds).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """latents (n, c, h, w), scaled -> images (n, 3, H, W) float32 in [0, 1]."""
        device = next(self.vae.parameters()).device
        out = []
        for i in range(0, len(latents), batch_size):
            x = self.vae.decode(latents[i : i + batch_size].to(device) / self.latent_scale).sample
            out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out)

    def ddim(self) -> DDIMScheduler:
        # clip_sample=False explicitly: from_config of a DDPM config otherwise warns and clips
        return DDIMScheduler.from_config(self.scheduler.config, clip_sample=False)

    def to(self, device: str | torch.device) -> "Bundle":
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device)
        return self


def _check_folder(path: Path) -> None:
    if path.is_file():  # a single-file .ckpt/.safetensors checkpoint: pickles may run code, and it has no layout
        raise ModelError(f"{path}: is a file, not a diffusers model folder; convert a single-file checkpoint with "
                         "diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)")
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():  # before loading GBs of weights
        raise ModelError(f"{path}: an SDXL-style folder (second text encoder); only SD-1.x-style models "
                         "(one CLIP text encoder, epsilon prediction) are supported")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelError(
            f"{path}: not a Stable-Diffusion-style diffusers folder; missing component folder(s) {missing}"
        )


def _load(what: str, where: Path, fn):
    try:
        return fn()
    except (OSError, ValueError, KeyError) as e:  # diffusers/transformers' own "no weights / bad config" errors
        raise ModelError(f"{where}: cannot load the {what}: {e}") from e


def _check_compatible(path: Path, b: Bundle) -> None:
    """What the training loss and sampler assume of a real model, checked once at load."""
    pt = b.scheduler.config.prediction_type
    if pt != "epsilon":  # finetune's target is the noise; an SD-2.x 768 (v-prediction) model would silently degrade
        raise ModelError(f"{path / 'scheduler'}: prediction_type {pt!r}; only epsilon-prediction models (SD-1.x style) are supported")
    if b.unet.config.addition_embed_type is not None:
        raise ModelError(f"{path / 'unet'}: addition_embed_type {b.unet.config.addition_embed_type!r} "
                         "(SDXL-style added conditioning) is not supported")
    d, x = b.text_encoder.config.hidden_size, b.unet.config.cross_attention_dim
    if isinstance(x, int) and x != d:
        raise ModelError(f"{path}: unet cross_attention_dim {x} != text_encoder hidden_size {d}")
    n_pos = getattr(b.text_encoder.config, "max_position_embeddings", None)
    if n_pos and b.tokenizer.model_max_length > n_pos:  # a tokenizer_config without model_max_length
        log.warning("%s: tokenizer model_max_length %d > text encoder positions %d; using %d",
                    path / "tokenizer", b.tokenizer.model_max_length, n_pos, n_pos)
        b.tokenizer.model_max_length = n_pos


def load_bundle(path: Path | str, *, unet_path: Path | str | None = None) -> Bundle:
    """Load every component from a local diffusers folder (safetensors only, no hub).

    Any SD-1.x-style folder works (StableDiffusionPipeline.save_pretrained's layout); the scheduler
    folder may hold any diffusers scheduler (SD ships PNDM): only its noise schedule is read."""
    path = Path(path)
    _check_folder(path)
    tok = _load("tokenizer", path / "tokenizer", lambda: AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True))
    if len(tok) <= 3:  # offline, transformers returns a near-empty tokenizer instead of raising
        raise ModelError(f"{path / 'tokenizer'}: tokenizer has only {len(tok)} tokens")
    text_encoder = _load("text encoder", path / "text_encoder", lambda: AutoModel.from_pretrained(
        path / "text_encoder", local_files_only=True, use_safetensors=True))
    unet_dir = Path(unet_path or path / "unet")
    unet = _load("UNet", unet_dir, lambda: UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True))
    bundle = Bundle(
        vae=_load("VAE", path / "vae", lambda: AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)),
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=_load("scheduler", path / "scheduler", lambda: DDPMScheduler.from_pretrained(path / "scheduler")),
    )
    _check_compatible(path, bundle)
    for m in (bundle.vae, bundle.text_encoder, bundle.unet):
        m.eval().requires_grad_(False)
    return bundle


def save_bundle(bundle: Bundle, path: Path | str) -> Path:
    """Write a diffusers folder atomically (memcontrol.atomic.atomic_dir: a temp folder renamed into
    place, the old model moved aside and removed only after; a crash never leaves half a model)."""
    path = Path(path)
    with atomic.atomic_dir(path) as tmp:
        write_bundle(bundle, tmp)
    return path


def write_bundle(bundle: Bundle, tmp: Path) -> None:
    """The diffusers folder's contents into the empty folder `tmp` (not atomic by itself: callers
    fill an `atomic_dir`, export adds its card and LoRA file before the rename)."""
    bundle.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    bundle.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    bundle.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    bundle.tokenizer.save_pretrained(tmp / "tokenizer")
    bundle.scheduler.save_pretrained(tmp / "scheduler")
    te_cls = type(bundle.text_encoder).__name__
    tok_cls = type(bundle.tokenizer).__name__
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(bundle.scheduler).__name__],
        "text_encoder": ["transformers", te_cls],
        "tokenizer": ["transformers", tok_cls],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
