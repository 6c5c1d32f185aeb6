"""FID / KID through torchmetrics on precomputed embeddings of real images: known answers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from memcontrol import assets
from memcontrol.embed import build_embedder, gaussian_blur, read_image
from memcontrol.quality import fid_kid, fid_kid_images

SKIMAGE = assets.pkgdir("skimage") / "data"
PHOTOS = "astronaut.png camera.png chelsea.png coffee.png coins.png horse.png ihc.png page.png rocket.jpg retina.jpg".split()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """26 real images: 16 pediatric chest X-rays and 10 scikit-image photos, (26, 3, 224, 224)."""
    paths = list(assets.pediatric_cxrs()) + [SKIMAGE / n for n in PHOTOS]
    return torch.stack([read_image(p, 224) for p in paths])


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("mobilenet_v2")


@pytest.fixture(scope="module")
def real_feats(embedder, images) -> np.ndarray:
    return embedder.embed(images)


def _kid_identical_closed_form(f: np.ndarray) -> float:
    """torchmetrics' KID estimator for a set against itself with subset = whole set:
    2 * mean_{i != j} k - 2 * mean_{i, j} k, with k(x, y) = (x.y / d + 1)^3."""
    f = f.astype(np.float64)
    k = (f @ f.T / f.shape[1] + 1.0) ** 3
    m = len(f)
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    return float(2 * off - 2 * k.sum() / m**2)


def test_fid_zero_and_kid_closed_form_for_identical_sets(real_feats):
    r = fid_kid(real_feats, real_feats, kid_subset_size=26)
    assert abs(r["fid"]) < 1e-2
    # the unbiased KID estimator assumes independent sets; for the very same set it is slightly
    # negative (the k(x_i, x_i) terms enter only the cross term), exactly this value:
    assert r["kid_mean"] == pytest.approx(_kid_identical_closed_form(real_feats), rel=1e-6)
    assert r["kid_mean"] <= 0 and r["kid_std"] < 1e-9
    assert (r["n_real"], r["n_fake"], r["kid_subset_size"]) == (26, 26, 26)


@pytest.mark.parametrize("corruption, levels", [("blur", (1.0, 2.0, 4.0)), ("noise", (0.05, 0.1, 0.2))])
def test_fid_and_kid_grow_monotonically_with_corruption(embedder, images, real_feats, corruption, levels):
    g = torch.Generator().manual_seed(0)
    fids, kids = [fid_kid(real_feats, real_feats, kid_subset_size=26)["fid"]], []
    kids.append(fid_kid(real_feats, real_feats, kid_subset_size=26)["kid_mean"])
    for s in levels:
        if corruption == "blur":
            x = gaussian_blur(images, s)
        else:
            x = (images + s * torch.randn(images.shape, generator=g)).clamp(0, 1)
        r = fid_kid(real_feats, embedder.embed(x), kid_subset_size=26)
        fids.append(r["fid"])
        kids.append(r["kid_mean"])
    assert np.all(np.diff(fids) > 0), fids
    assert np.all(np.diff(kids) > 0), kids
    assert kids[-1] > 0.1 and fids[-1] > 100


def test_fid_change_of_basis_is_exact(images):
    """fid_kid hands torchmetrics the features in a basis of their span; same FID as the raw features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from memcontrol.quality import PrecomputedFeatures

    f = build_embedder("pixel", grid=12).embed(images).astype(np.float64)  # d = 144 > 13 + 13 + 1
    raw = FrechetInceptionDistance(feature=PrecomputedFeatures(144))
    raw.update(torch.from_numpy(f[:13]), real=True)
    raw.update(torch.from_numpy(f[13:]), real=False)
    assert fid_kid(f[:13], f[13:], kid_subset_size=13)["fid"] == pytest.approx(float(raw.compute()), rel=1e-6)


def test_kid_subset_size_clipped_with_warning_and_seeded(real_feats, caplog):
    with caplog.at_level(logging.WARNING, logger="memcontrol.quality"):
        r = fid_kid(real_feats[:20], real_feats[6:], kid_subset_size=50)
    assert r["kid_subset_size"] == 20 and "clipped" in caplog.text
    a = fid_kid(real_feats[:20], real_feats[6:], kid_subset_size=10, kid_subsets=20, seed=1)
    b = fid_kid(real_feats[:20], real_feats[6:], kid_subset_size=10, kid_subsets=20, seed=1)
    c = fid_kid(real_feats[:20], real_feats[6:], kid_subset_size=10, kid_subsets=20, seed=2)
    assert a == b and a["kid_mean"] != c["kid_mean"]
    torch.manual_seed(0)
    fid_kid(real_feats[:20], real_feats[6:], kid_subset_size=10, kid_subsets=5, seed=9)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.rand(1) == after  # the caller's torch RNG stream is untouched


def test_fid_kid_images_equals_feature_path(images):
    pix = build_embedder("pixel", grid=8)
    a = fid_kid_images(images[:13], images[13:], pix, kid_subset_size=13)
    b = fid_kid(pix.embed(images[:13]), pix.embed(images[13:]), kid_subset_size=13)
    assert a == b


def test_fid_kid_reject_bad_input(real_feats):
    with pytest.raises(ValueError, match="dim"):
        fid_kid(real_feats, real_feats[:, :10])
    with pytest.raises(ValueError, match="n >= 2"):
        fid_kid(real_feats[:1], real_feats)
