"""Memorization metrics of a set of generations.

- `calibrate_threshold` / `nn_scores`: Somepalli et al.'s score (flagged rate, mean and 95th
  percentile of each generation's max similarity to the training set, searched in
  `memcontrol.reference_index.ReferenceIndex`), with a threshold either fixed or calibrated on
  held-out real images.
- `amd`: MiFID's average minimum cosine distance (Bai et al. 2021).
- `noise_norm`: Wen et al.'s text-conditional noise-prediction magnitude, computed the way the
  reference implementation computes its reward (docs/paper.md §4.1), without its CFG-dropout and
  autograd bugs (docs/paper.md §6).

Formulas, directions and weaknesses: docs/metrics.md. The known-answer check of embedder + index +
threshold under augmentation is in memcontrol/validation.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from memcontrol.reference_index import check_feats, l2_normalise

LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scores


def calibrate_threshold(heldout_max_sims: np.ndarray, quantile: float, *, warn: bool = True) -> float:
    """Similarity threshold from held-out real images (split-conformal quantile).

    A generation is flagged when its max similarity is ``> threshold``. The threshold is the
    ``ceil((n + 1) * quantile)``-th smallest of the n held-out max similarities, so that a new image
    exchangeable with the held-out ones is flagged with probability <= ``1 - quantile``. When n is
    too small for that (``n < quantile / (1 - quantile)``) the largest held-out value is returned
    and a warning is logged: the guarantee then does not hold.

    Args:
        heldout_max_sims: (n,) max similarity of each held-out real image to the training set.
        quantile: in (0, 1), e.g. 0.95.
    """
    s = np.sort(np.asarray(heldout_max_sims, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("heldout_max_sims must be a non-empty array of finite similarities")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    k = math.ceil((s.size + 1) * quantile)
    if k > s.size and warn:
        LOG.warning(
            "calibrate_threshold: %d held-out images are too few for quantile %.3f (need >= %d); using their max",
            s.size, quantile, math.ceil(quantile / (1 - quantile)),
        )
    k = min(k, s.size)
    return float(s[k - 1])


@dataclass(frozen=True)
class NNScores:
    """Nearest-training-neighbour similarity of a set of generations (Somepalli et al.).

    flagged_rate: share with max similarity > threshold (higher = more copying).
    mean_sim, p95_sim: mean and 95th percentile of the max similarity (p95 is Somepalli's
        dataset-level "similarity score"; higher = more copying).
    """

    n: int
    flagged_rate: float
    mean_sim: float
    p95_sim: float
    threshold: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def nn_scores(max_sims: np.ndarray, threshold: float) -> NNScores:
    """Scores from each generation's max similarity to the training set.

    Args:
        max_sims: (m,) or (m, k) similarities (column 0 is used: `ReferenceIndex.search` sorts descending).
        threshold: flag when ``sim > threshold``.
    """
    s = np.asarray(max_sims, dtype=np.float64)
    if s.ndim == 2:
        s = s[:, 0]
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"max_sims must be a non-empty finite (m,) or (m, k) array, got shape {np.shape(max_sims)}")
    return NNScores(
        n=int(s.size),
        flagged_rate=float((s > threshold).mean()),
        mean_sim=float(s.mean()),
        p95_sim=float(np.percentile(s, 95)),
        threshold=float(threshold),
    )


def amd(gen_feats: np.ndarray, train_feats: np.ndarray, *, mean: np.ndarray | None = None, block: int = 4096) -> float:
    """Average minimum cosine distance (MiFID's memorization term, Bai et al. 2021).

    ``AMD = 1/|G| * sum_{g in G} min_{t in T} (1 - |cos(f(g), f(t))|)``: for each generated image the
    distance to its closest training image (the Kaggle/MiFID original direction; torchmetrics'
    MiFID takes min over generated for each real instead). Higher = further from the training set
    = less memorization. Exact, blocked over both sets.

    Args:
        gen_feats: (m, d) raw generated embeddings.
        train_feats: (n, d) raw training embeddings.
        mean: optional (d,) vector subtracted from both before normalising (e.g. `ReferenceIndex.mean`).
    """
    g = check_feats(gen_feats, "gen_feats")
    t = check_feats(train_feats, "train_feats", g.shape[1])
    if mean is not None:
        g, t = g - mean, t - mean
    g, t = l2_normalise(g), l2_normalise(t)
    total = 0.0
    for i in range(0, len(g), block):
        best = np.zeros(min(block, len(g) - i), dtype=np.float32)
        for j in range(0, len(t), block):
            best = np.maximum(best, np.abs(g[i : i + block] @ t[j : j + block].T).max(axis=1))
        total += float((1.0 - np.minimum(best, 1.0)).sum())
    return total / len(g)


# ----------------------------------------------------------------------------- noise norm (Wen et al.)


def _sample_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def noise_norm(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scheduler,
    *,
    seed: int,
    batch_size: int = 32,
    cond_mask: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
) -> dict:
    """Text-conditional noise-prediction magnitude (Wen et al. ICLR'24) as the reference codes its
    memorization reward (docs/paper.md §4.1).

    For each sample i: t_i ~ U{0..T-1}, eps_i ~ N(0, I), z_t = scheduler.add_noise(z0_i, eps_i, t_i),
    ``g_i = || unet(z_t, t_i, c_i) - unet(z_t, t_i, "") ||_2`` over the flattened latent.
    Higher = the prompt pulls the prediction harder = more memorization.

    Unlike the reference there is no CFG dropout (it zeroes ~10% of the g_i) and no autograd. t_i
    and eps_i come from a generator seeded by (seed, i), so a sample's noise does not depend on the
    batch size or on the other samples: every trial sees the same noise.

    Args:
        unet: diffusers ``UNet2DConditionModel`` (or compatible: ``unet(z, t, encoder_hidden_states=...,
            encoder_attention_mask=...).sample``).
        latents: (n, c, h, w) clean latents z0 (already scaled by the VAE scaling factor).
        cond: (n, L, D) text-encoder states of the captions.
        uncond: (1, L, D) states of the empty caption.
        scheduler: diffusers ``DDPMScheduler`` (``add_noise``, ``config.num_train_timesteps``).
        seed: base seed.
        batch_size: samples per UNet call; also the group size of the "max" variant.
        cond_mask: optional (n, L) encoder attention mask of ``cond``.
        uncond_mask: optional (1, L) mask of ``uncond`` (defaults to all ones when ``cond_mask`` is given).

    Returns:
        {"max": mean over batches of the per-batch max g_i (the reference's ``max_norm``; depends on
        batch_size), "mean": mean of g_i over samples, "per_sample": (n,) float64 g_i,
        "timesteps": (n,) int64 t_i}.
    """
    n = latents.shape[0]
    if n == 0 or cond.shape[0] != n or uncond.ndim != 3 or uncond.shape[0] != 1 or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"noise_norm: need latents (n, c, h, w), cond (n, L, D), uncond (1, L, D); got "
            f"{tuple(latents.shape)}, {tuple(cond.shape)}, {tuple(uncond.shape)}"
        )
    if cond_mask is not None and tuple(cond_mask.shape) != tuple(cond.shape[:2]):
        raise ValueError(f"noise_norm: cond_mask must be (n, L) = {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
    if uncond_mask is None and cond_mask is not None:
        uncond_mask = torch.ones(1, cond.shape[1], dtype=cond_mask.dtype)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    n_t = int(scheduler.config.num_train_timesteps)
    was_training = unet.training
    unet.eval()
    ts = np.empty(n, dtype=np.int64)
    eps = torch.empty(latents.shape, dtype=torch.float32)
    for i in range(n):
        g = torch.Generator().manual_seed(_sample_seed(seed, i))
        ts[i] = int(torch.randint(0, n_t, (1,), generator=g))
        eps[i] = torch.randn(latents.shape[1:], generator=g)
    per_sample = np.empty(n, dtype=np.float64)
    batch_max = []
    try:
        for i in range(0, n, batch_size):
            z0 = latents[i : i + batch_size].to(device, torch.float32)
            b = z0.shape[0]
            t = torch.from_numpy(ts[i : i + b]).to(device)
            zt = scheduler.add_noise(z0, eps[i : i + b].to(device), t).to(dtype)
            kw_c = {"encoder_hidden_states": cond[i : i + b].to(device, dtype)}
            kw_u = {"encoder_hidden_states": uncond.to(device, dtype).expand(b, -1, -1)}
            if cond_mask is not None:
                kw_c["encoder_attention_mask"] = cond_mask[i : i + b].to(device)
                kw_u["encoder_attention_mask"] = uncond_mask.to(device).expand(b, -1)
            e_c = unet(zt, t, **kw_c).sample.float()
            e_u = unet(zt, t, **kw_u).sample.float()
            g = (e_c - e_u).flatten(1).norm(dim=1).double().cpu().numpy()
            per_sample[i : i + b] = g
            batch_max.append(g.max())
    finally:
        unet.train(was_training)
    return {"max": float(np.mean(batch_max)), "mean": float(per_sample.mean()), "per_sample": per_sample, "timesteps": ts}
