"""Pretraining of the embedded default's tiny base model (VAE, then UNet) on the `base` split."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

log = logging.getLogger(__name__)


def pretrain_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    kl_weight: float,
    seed: int,
    crop: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """images (n, 3, H, W) in [-1, 1]. L1 + MSE reconstruction plus a small KL term, as the
    latent-diffusion autoencoders do without their perceptual/GAN losses (no pretrained LPIPS offline).

    `crop`: train on random crop x crop patches. The VAE is fully convolutional, so patches
    teach it the same local code at a fraction of the cost per step (more steps, same time)."""
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx]
        if crop is not None and crop < x.shape[-1]:
            i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
            x = x[..., i : i + crop, j : j + crop]
        # random horizontal shifts keep the tiny VAE from overfitting the few hundred images
        if torch.rand(1, generator=gen).item() < 0.5:
            x = torch.flip(x, dims=[3])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("pretrain_vae: step %d/%d, loss %.4f", step + 1, steps, sum(losses[-20:]) / len(losses[-20:]))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (SD's 0.18215
    was derived the same way for its own VAE)."""
    zs = [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    std = torch.cat(zs).std().item()
    return 1.0 / max(std, 1e-6)
