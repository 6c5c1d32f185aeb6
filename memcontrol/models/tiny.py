"""The embedded default's tiny Stable-Diffusion-architecture model: diffusers AutoencoderKL and
UNet2DConditionModel with cross-attention, conditioned on the frozen pretrained all-MiniLM-L6-v2."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

from memcontrol import assets
from memcontrol.config import TinyModel
from memcontrol.models.bundle import Bundle


def sd_scheduler() -> DDPMScheduler:
    """SD-1.5's training scheduler: 1000 steps, scaled-linear betas 0.00085-0.012 (docs/paper.md §2.2)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,  # as SD-1.5; StableDiffusionPipeline rewrites any other value to 1
    )


def text_encoder(max_tokens: int) -> tuple[torch.nn.Module, object]:
    """Frozen all-MiniLM-L6-v2 (384-d token states) and its tokenizer, from the installed package."""
    path = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=max_tokens)
    enc = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    # Read by StableDiffusionPipeline.encode_prompt: pass the padding mask to BERT as it was trained.
    enc.config.use_attention_mask = True
    enc.eval().requires_grad_(False)
    return enc, tok


def build(cfg: TinyModel, *, seed: int = 0) -> Bundle:
    """Randomly initialised VAE + UNet (seeded) around the pretrained text encoder."""
    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=cfg.resolution,
    )
    enc, tok = text_encoder(cfg.max_prompt_tokens)
    m = len(cfg.unet_channels)
    # SD-1.5 shape in miniature: cross-attention down blocks then a plain one; mirrored going up.
    down = ("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (n - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.unet_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=enc.config.hidden_size,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    return Bundle(vae=vae, unet=unet, text_encoder=enc, tokenizer=tok, scheduler=sd_scheduler())
