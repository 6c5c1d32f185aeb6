"""The inner loop: fine-tune a (masked, adapted) UNet with the epsilon-MSE objective.

One loop serves every method, the base-model pretraining and Stage 2; what is trained is decided
by the param groups handed in (memcontrol.tuning.apply builds them from a mask)."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DConditionModel

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Cached inputs of one training set; nothing is re-encoded per step.

    latent_mean, latent_std: (n, c, h, w) float32, scaled VAE posterior of each distinct image;
    text: (p, L, D) float32 text states of each distinct prompt; null_text: (1, L, D) for "";
    image_idx, prompt_idx: (m,) int64, one entry per training item (repeats appear repeatedly);
    prompts: the p prompt strings (needed by caption-side mitigations)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: torch.Tensor
    null_text: torch.Tensor
    image_idx: torch.Tensor
    prompt_idx: torch.Tensor
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image_idx.numel())


# A batch transform sees (text states (b, L, D), prompt indices (b,), generator) and returns new
# text states; caption-side mitigations (embedding noise, random word addition) plug in here.
TextTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
# A loss filter sees per-sample losses (b,) and the batch and returns per-sample weights (b,);
# the Wen et al. training-time filter plugs in here.
LossFilter = Callable[..., torch.Tensor]


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    dropped: int = 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def finetune(
    unet: UNet2DConditionModel,
    groups: list[dict],
    data: TrainData,
    scheduler: DDPMScheduler,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    cfg_dropout: float = 0.1,
    grad_clip: float = 1.0,
    weight_decay: float = 1e-2,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    device: str = "auto",
    text_transform: TextTransform | None = None,
    loss_filter: LossFilter | None = None,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Run `steps` AdamW steps (beta 0.9/0.999, eps 1e-8, constant LR) in place on `unet`.

    Items are drawn by a seeded permutation, epoch after epoch. Captions are replaced by "" with
    probability `cfg_dropout` (exactly, not the reference's randint/100 < p) so the model learns
    the unconditional branch classifier-free guidance needs. `should_stop(n_steps_done)`, called after
    each step, ends the run early when it returns True (multi-fidelity early stopping,
    memcontrol/fidelity.py); TrainResult.steps is then the steps actually run."""
    import time

    if len(data) == 0:
        raise ValueError("finetune: the training set is empty")
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("finetune: no trainable parameters in the given groups")
    device = resolve_device(device)
    # accelerate keeps one state per process; reset it so base pretraining (fp32) and a later
    # mixed-precision fine-tune can share a process (`memcontrol demo`).
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Trainable tensors stay fp32 under autocast (fp16 master weights lose small updates); frozen
    # weights are not touched.
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups],
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=weight_decay,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    dev = accelerator.device
    gen = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod.to(dev)
    n = len(data)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    dropped = 0
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        items = order[pos : pos + min(batch_size, n)]
        pos += len(items)
        img = data.image_idx[items]
        pidx = data.prompt_idx[items]
        mean, std = data.latent_mean[img], data.latent_std[img]
        z0 = mean + std * torch.randn(mean.shape, generator=gen)
        text = data.text[pidx]
        if text_transform is not None:
            text = text_transform(text, pidx, gen)
        drop = torch.rand(len(items), generator=gen) < cfg_dropout
        text = torch.where(drop[:, None, None], data.null_text.expand_as(text), text)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=gen)
        z0, noise, t, text = z0.to(dev), noise.to(dev), t.to(dev), text.to(dev)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        zt = a * z0 + s * noise
        with accelerator.autocast():
            pred = unet(zt, t, encoder_hidden_states=text).sample
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if loss_filter is not None:
            w = loss_filter(unet=unet, zt=zt, t=t, text=text, null_text=data.null_text.to(dev), per_sample=per_sample)
            dropped += int((w == 0).sum())
            loss = (per_sample * w).sum() / w.sum().clamp(min=1)
        else:
            loss = per_sample.mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"finetune: loss became {loss.item()} at step {step}")
        accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
        if (step + 1) % max(1, steps // 10) == 0:  # visible in Prefect logs, where no bar is drawn
            log.info("finetune: step %d/%d, loss %.4f", step + 1, steps, float(np.mean(losses[-20:])))
        if should_stop is not None and should_stop(step + 1):
            log.info("finetune: stopped early after %d/%d steps", step + 1, steps)
            break
    unet.eval()
    if gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    # Release the optimizer (AdamW state) now. With fp16 on a GPU, accelerate's optimizer wrapper
    # patches its own step method with a closure that refers back to it: a reference cycle that
    # kept the optimizer, its state and the trained parameters alive until Python's cyclic GC ran,
    # i.e. into the next trial (docs/performance.md "Memory").
    del optimizer
    accelerator.free_memory()
    gc.collect()
    seconds = time.perf_counter() - t0
    log.info("finetune: %d steps in %.1fs, final loss %.4f", len(losses), seconds, float(np.mean(losses[-10:])))
    return TrainResult(losses=losses, steps=len(losses), seconds=seconds, dropped=dropped)
