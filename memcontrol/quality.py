"""Generation quality: FID and KID through torchmetrics with a custom feature module.

torchmetrics' Inception backbone needs torch-fidelity and torchvision, neither usable here, so the
metrics are fed *precomputed* embeddings through an identity feature module: the held-out prompts'
generations are embedded once per trial by the quality embedder (`metrics.quality_embedder`, a
`memcontrol.embed.Embedder`), the real side once by the reference stage.

- FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)); lower = closer to the real set.
  Biased upwards at small n (and with n < d the covariances are rank-deficient).
  FID is invariant to rotations of the feature space, and when n + m + 1 < d all of it lives in
  the span of the centred features and the mean difference. torchmetrics then gets the features
  in an orthonormal basis of that span (an exact change of basis, not an approximation): its
  general d x d eigendecomposition costs seconds to a minute on 2 CPU cores at d = 1280, while the
  (n + m + 1)-dim one is instant.
- KID = unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  ``kid_subsets`` random subsets of ``kid_subset_size``; lower = closer; ~0 (can be < 0) for equal
  distributions.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

LOG = logging.getLogger(__name__)


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": torchmetrics receives embeddings instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)  # read by torchmetrics instead of a dummy forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features (n, {self.num_features}), got shape {tuple(x.shape)}")
        return x


def _feats(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"`{name}` must be (n >= 2, d) features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"`{name}` contains NaN or inf")
    return t


def _span_basis(r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Express (n, d) and (m, d) float64 features in an orthonormal basis of the span of the centred
    rows and the mean difference, when that is smaller than d (FID is unchanged, see module doc)."""
    n, m, d = r.shape[0], f.shape[0], r.shape[1]
    if n + m + 1 >= d:
        return r, f
    mr, mf = r.mean(0, keepdim=True), f.mean(0, keepdim=True)
    span = torch.cat([r - mr, f - mf, mr - mf]).T  # (d, n + m + 1)
    q, _ = torch.linalg.qr(span)  # (d, n + m + 1) orthonormal columns covering the span
    return (r - mr) @ q, (f - mr) @ q


def fid_kid(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    *,
    kid_subset_size: int = 50,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID and KID between two feature sets (computed in float64).

    Args:
        real_feats: (n, d) embeddings of real images.
        fake_feats: (m, d) embeddings of generated images, same embedder.
        kid_subset_size: KID subset size, clipped to min(n, m) with a warning.
        kid_subsets: number of KID subsets.
        seed: seeds KID's subset sampling (torch RNG forked, the caller's state is untouched).

    Returns:
        {"fid", "kid_mean", "kid_std", "kid_subset_size", "n_real", "n_fake"}.
    """
    r, f = _feats(real_feats, "real_feats"), _feats(fake_feats, "fake_feats")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_feats dim {r.shape[1]} != fake_feats dim {f.shape[1]}")
    n, m, d = r.shape[0], f.shape[0], r.shape[1]
    if min(n, m) <= d:
        LOG.info("FID with n_real=%d, n_fake=%d <= d=%d: covariances are rank-deficient, FID is biased/noisy", n, m, d)
    ss = kid_subset_size
    if ss > min(n, m):
        LOG.warning("kid_subset_size=%d > min(n_real=%d, n_fake=%d); clipped", ss, n, m)
        ss = min(n, m)
    r_fid, f_fid = _span_basis(r, f)
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(r_fid.shape[1]))
    fid.update(r_fid, real=True)
    fid.update(f_fid, real=False)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended, they are small
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(d), subsets=kid_subsets, subset_size=ss)
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": int(ss),
        "n_real": int(n),
        "n_fake": int(m),
    }


def fid_kid_images(real_images: torch.Tensor, fake_images: torch.Tensor, embedder, *, batch_size: int = 64, **kw) -> dict[str, float | int]:
    """`fid_kid` over images: (n, 3, H, W) and (m, 3, H, W) float in [0, 1], embedded by ``embedder``."""
    return fid_kid(embedder.embed(real_images, batch_size), embedder.embed(fake_images, batch_size), **kw)
