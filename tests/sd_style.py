"""Build a Stable-Diffusion-1.5-style diffusers folder the way a user's local copy looks: SD-1.5's
published component configs (block types, layers per block, 8x VAE, PNDM scheduler, CLIP text
encoder with 77 positions and the real 49,408-token CLIP vocabulary) with only the widths shrunk,
written by `StableDiffusionPipeline.save_pretrained` (diffusers' and transformers' own writers).

Random weights: this is the real-model *path* (loading, block layout, tokenisation, stages), not a
model that draws radiographs."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from memcontrol.models.clip import clip_tokenizer

# SD-1.5 (runwayml/stable-diffusion-v1-5) component configs, as published in its folders.
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,  # SD-1.5's (legacy) values, kept as a user has them
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)

# The 16 transformer blocks of SD-1.5's UNet, in the order memcontrol.tuning enumerates them.
SD15_BLOCKS = tuple(
    [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{i}.attentions.{j}" for i in range(1, 4) for j in range(3)]
)


def build_sd_style(path: Path, *, resolution: int = 64, seed: int = 0) -> Path:
    """Write an SD-1.5-layout folder at `path` for `resolution`-px images (latents resolution/8);
    widths: UNet (32, 64, 64, 64), VAE (16, 32, 32, 32), CLIP text 64-d x 2 layers."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64,
                                   "sample_size": resolution // 8})
    vae = AutoencoderKL(**{**SD15_VAE, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 16,
                           "sample_size": resolution})
    text = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT, "hidden_size": 64, "intermediate_size": 128,
                                           "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 64}))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(77), unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
