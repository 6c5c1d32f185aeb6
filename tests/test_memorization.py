"""Memorization metrics on known answers with real images: FAISS index, thresholds, AMD,
copy detection under augmentation, the extraction attack and the noise-norm proxy."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from memcontrol import assets
from memcontrol.embed import build_embedder, read_image, square_image
from memcontrol.extraction import (
    REFERENCE_RMS_THRESHOLD,
    calibrate_tile_threshold,
    extraction_attack,
    tile_distance,
)
from memcontrol.memorization import amd, calibrate_threshold, nn_scores, noise_norm
from memcontrol.reference_index import ReferenceIndex, brute_force_search, l2_normalise
from memcontrol.validation import augmentations, copy_detection_rates

SKIMAGE = assets.pkgdir("skimage") / "data"
PHOTOS = "astronaut.png brick.png camera.png cell.png chelsea.png coffee.png coins.png grass.png gravel.png horse.png ihc.png moon.png page.png rocket.jpg text.png".split()


@pytest.fixture(scope="module")
def cxr() -> tuple[torch.Tensor, np.ndarray]:
    """17 real chest X-rays (16 pediatric + adult RG1), (17, 3, 224, 224), and a patient id per image."""
    paths = list(assets.pediatric_cxrs()) + [assets.adult_cxr_dicom()]
    groups = [re.match(r"(NORMAL2-IM-\d+|person\d+|RG1)", p.name).group(1) for p in paths]
    return torch.stack([read_image(p, 224) for p in paths]), np.unique(groups, return_inverse=True)[1]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.stack([read_image(SKIMAGE / n, 224) for n in PHOTOS])


@pytest.fixture(scope="module")
def lfw() -> torch.Tensor:
    """60 real 25x25 LFW crops (faces and non-faces), upsampled to 224."""
    a = np.load(SKIMAGE / "lfw_subset.npy")[::200 // 60][:60]
    return torch.stack([square_image(x, 224) for x in a])


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("mobilenet_v2")


@pytest.fixture(scope="module")
def feats(embedder, cxr, photos, lfw) -> dict[str, np.ndarray]:
    return {"cxr": embedder.embed(cxr[0]), "photos": embedder.embed(photos), "lfw": embedder.embed(lfw)}


@pytest.fixture(scope="module")
def mild_copy_feats(embedder, cxr) -> dict[str, np.ndarray]:
    """One mildly augmented copy of each CXR per augmentation, embedded (row i = copy of image i)."""
    rng = np.random.default_rng(0)
    return {name: embedder.embed(torch.stack([fn(x, rng) for x in cxr[0]])) for name, fn in augmentations("mild").items()}


# ----------------------------------------------------------------------------- index


def test_l2_normalise_unit_rows_and_zero_rows():
    x = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])
    assert x.dtype == np.float32


@pytest.mark.parametrize("center", [True, False])
def test_flat_index_agrees_with_numpy_brute_force(feats, mild_copy_feats, center):
    ref = np.concatenate([feats["cxr"], feats["photos"], feats["lfw"]])
    q = np.concatenate(list(mild_copy_feats.values()))
    index = ReferenceIndex.build(ref, kind="flat", center=center)
    s, i = index.search(q, k=5, batch_size=7)
    bs, bi = brute_force_search(ref, q, k=5, center=center, block=13)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    tie = np.isclose(s, bs, atol=1e-6) & (i != bi)  # equal similarities may swap order
    assert ((i == bi) | tie).all()
    assert s.dtype == np.float32 and i.dtype == np.int64 and (np.diff(s, axis=1) <= 1e-6).all()
    # exact copies find themselves with cosine 1
    s0, i0 = index.search(feats["cxr"], k=1)
    np.testing.assert_array_equal(i0[:, 0], np.arange(17))
    np.testing.assert_allclose(s0[:, 0], 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def lfw_pixels() -> tuple[np.ndarray, np.ndarray]:
    """All 200 LFW crops as 16x16 pixel embeddings, and noisy copies of 100 of them as queries."""
    a = np.load(SKIMAGE / "lfw_subset.npy").astype(np.float32)
    imgs = torch.from_numpy(a)[:, None]
    e = build_embedder("pixel", grid=16)
    g = torch.Generator().manual_seed(0)
    noisy = (imgs[::2] + 0.05 * torch.randn(imgs[::2].shape, generator=g)).clamp(0, 1)
    return e.embed(imgs), e.embed(noisy)


@pytest.mark.parametrize(
    "kw, min_recall",
    [
        (dict(kind="ivf", nlist=4, nprobe=4), 1.0),  # all cells probed: exact
        (dict(kind="ivf", nlist=4, nprobe=1), 0.8),
        (dict(kind="hnsw"), 0.98),
        (dict(kind="flat", dtype="float16"), 0.98),  # near-ties may swap
        (dict(kind="hnsw", dtype="float16"), 0.98),
        (dict(kind="flat", pca_dim=64), 0.9),
    ],
)
def test_approximate_indexes_recall_against_exact(lfw_pixels, kw, min_recall):
    ref, q = lfw_pixels
    _, exact = brute_force_search(ref, q, k=1)
    index = ReferenceIndex.build(ref, **kw)
    sims, idx = index.search(q, k=1)
    recall = (idx[:, 0] == exact[:, 0]).mean()
    assert recall >= min_recall, f"{kw}: recall@1 {recall:.3f}"
    assert sims.shape == (100, 1) and idx.dtype == np.int64


def test_index_save_load_roundtrip(tmp_path, lfw_pixels):
    ref, q = lfw_pixels
    for kw in (dict(kind="ivf", nlist=4, dtype="float16"), dict(kind="flat", pca_dim=32, center=False)):
        index = ReferenceIndex.build(ref, **kw)
        d = tmp_path / kw["kind"]
        index.save(d)
        assert sorted(p.name for p in d.iterdir()) == ["arrays.npz", "index.faiss", "meta.json"]
        loaded = ReferenceIndex.load(d)
        assert loaded.settings == index.settings and loaded.ntotal == 200
        for a, b in zip(loaded.search(q, k=3), index.search(q, k=3)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ReferenceIndex.load(tmp_path / "nothing")


def test_index_rejects_bad_input(lfw_pixels):
    ref, q = lfw_pixels
    index = ReferenceIndex.build(ref)
    with pytest.raises(ValueError, match="dim 3"):
        index.search(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(q, k=201)
    with pytest.raises(ValueError, match="NaN"):
        ReferenceIndex.build(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="kind"):
        ReferenceIndex.build(ref, kind="lsh")


# ----------------------------------------------------------------------------- thresholds and scores


def test_calibrate_threshold_split_conformal_known_answers(caplog):
    s = np.arange(1, 20) / 20.0  # 19 held-out sims 0.05 .. 0.95
    assert calibrate_threshold(s, 0.95) == pytest.approx(0.95)  # ceil(20 * 0.95) = 19th smallest
    assert calibrate_threshold(s, 0.5) == pytest.approx(0.5)  # ceil(20 * 0.5) = 10th
    with caplog.at_level(logging.WARNING, logger="memcontrol.memorization"):
        assert calibrate_threshold(s[:5], 0.95) == pytest.approx(0.25)  # too few: their max
    assert "too few" in caplog.text
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(s, 1.0)


def test_nn_scores_known_answer():
    sc = nn_scores(np.array([[0.9, 0.1], [0.2, 0.1], [0.6, 0.5], [0.3, 0.0]]), threshold=0.5)
    assert sc.n == 4 and sc.flagged_rate == 0.5 and sc.mean_sim == pytest.approx(0.5)
    assert sc.p95_sim == pytest.approx(np.percentile([0.9, 0.2, 0.6, 0.3], 95))
    assert set(sc.to_dict()) == {"n", "flagged_rate", "mean_sim", "p95_sim", "threshold"}


def test_amd_known_answers(feats, mild_copy_feats):
    e = np.eye(4, dtype=np.float32)
    assert amd(e, e) == pytest.approx(0.0)
    assert amd(e[:2], e[2:]) == pytest.approx(1.0)  # orthogonal
    assert amd(-e, e) == pytest.approx(0.0)  # |cos|: anti-parallel counts as close (MiFID)
    train = feats["cxr"][::2]
    copies = mild_copy_feats["jpeg"][::2]
    heldout = feats["cxr"][1::2]
    mean = train.mean(0)
    # copies of the training images are closer to it than held-out real images: lower AMD
    assert amd(copies, train, mean=mean) < amd(heldout, train, mean=mean)
    assert amd(copies, train, block=3) == pytest.approx(amd(copies, train), rel=1e-6)


# ----------------------------------------------------------------------------- copy detection on real CXRs


def _group_splits(groups: np.ndarray, n_splits: int, seed: int = 1):
    rs = np.random.default_rng(seed)
    ug = np.unique(groups)
    for _ in range(n_splits):
        tr_g = rs.permutation(ug)[: len(ug) // 2]
        yield np.flatnonzero(np.isin(groups, tr_g)), np.flatnonzero(~np.isin(groups, tr_g))


def test_exact_and_mildly_augmented_cxr_copies_are_flagged(feats, mild_copy_feats, cxr):
    """Default embedder, centring, threshold calibrated at 0.95 on held-out CXRs (patient split)."""
    rates = {name: [] for name in mild_copy_feats}
    for tr, ho in _group_splits(cxr[1], 8):
        rep = copy_detection_rates(feats["cxr"][tr], {n: f[tr] for n, f in mild_copy_feats.items()}, feats["cxr"][ho], quantile=0.95)
        for n in rates:
            rates[n].append(rep.copy_rates[n])
    mean = {n: float(np.mean(r)) for n, r in rates.items()}
    assert mean["exact"] == 1.0
    assert all(r >= 0.9 for r in mean.values()), mean


def test_heldout_real_images_flagged_at_most_as_calibrated(feats):
    """Random thirds train / calibration / check of 92 real images: the check third is flagged at
    <= 1 - quantile on average (split-conformal guarantee), with or without centring."""
    allf = np.concatenate([feats["cxr"], feats["photos"], feats["lfw"]])
    rs = np.random.default_rng(0)
    for center in (True, False):
        flagged = []
        for _ in range(150):
            tr, ca, ch = np.array_split(rs.permutation(len(allf)), 3)
            rep = copy_detection_rates(allf[tr], {}, allf[ca], allf[ch], quantile=0.9, center=center)
            flagged.append(rep.heldout_check_rate)
        assert np.mean(flagged) <= 0.1 + 0.02, (center, np.mean(flagged))


# ----------------------------------------------------------------------------- extraction attack


def test_tile_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 224, 224, generator=g) * 0.5
    assert np.allclose(tile_distance(a, a), [[0, tile_distance(a[:1], a[1:])[0, 0]], [tile_distance(a[1:], a[:1])[0, 0], 0]])
    np.testing.assert_allclose(np.diag(tile_distance(a, a + 0.1)), 0.1, rtol=1e-6)  # uniform shift: RMS 0.1 in every tile
    b = a.clone()
    b[:, :, 56:112, 168:224] += 0.3  # one tile only: the max picks it
    np.testing.assert_allclose(np.diag(tile_distance(a, b)), 0.3, rtol=1e-6)
    # the reference's unnormalised 4x4 tile L2 at 224 px is our RMS times sqrt(3 * 56 * 56)
    a64, b64 = a.double(), b.double()
    ref = max(float((a64[0, :, i:i + 56, j:j + 56] - b64[0, :, i:i + 56, j:j + 56]).norm()) for i in range(0, 224, 56) for j in range(0, 224, 56))
    assert tile_distance(a[:1], b[:1])[0, 0] * np.sqrt(9408) == pytest.approx(ref)
    assert REFERENCE_RMS_THRESHOLD == pytest.approx(20.0 / np.sqrt(9408))


def test_extraction_attack_finds_planted_cluster_and_ignores_diverse_sets(cxr, photos):
    small = torch.nn.functional.interpolate(torch.cat([cxr[0], photos]), size=(64, 64), mode="area")
    cx, ph = small[:17], small[17:]
    groups = np.concatenate([cxr[1], 100 + np.arange(len(ph))])
    thr = calibrate_tile_threshold(small, 0.01, groups=groups)
    assert thr < REFERENCE_RMS_THRESHOLD  # the reference's threshold links distinct real images here
    g = torch.Generator().manual_seed(0)

    def near_copies(x, n):
        return torch.stack([(x * (0.95 + 0.1 * torch.rand(1, generator=g)) + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1) for _ in range(n)])

    planted = torch.cat([near_copies(cx[3], 4), ph[:4]])  # 4 near-copies of its training image + 4 others
    diverse = torch.cat([cx[[0, 5, 10, 16]], ph[4:8]])  # distinct patients and photos
    wrong = torch.cat([near_copies(cx[7], 3), ph[8:13]])  # a memorized cluster, but not of its own image
    res = extraction_attack([planted, diverse, wrong], [cx[3], cx[0], cx[2]], threshold=thr, min_component=3)
    p0, p1, p2 = res.prompts
    assert (p0.memorized, p0.extracted, sorted(p0.component)) == (True, True, [0, 1, 2, 3])
    assert (p1.memorized, p1.extracted, p1.largest_component) == (False, False, 1)
    assert (p2.memorized, p2.extracted) == (True, False)
    assert (res.n_memorized, res.n_extracted, res.extracted_given_memorized) == (2, 1, 0.5)
    same = extraction_attack(torch.stack([planted, wrong]), torch.stack([cx[3], cx[2]]), threshold=thr, min_component=3)
    assert same.summary() == extraction_attack([planted, wrong], [cx[3], cx[2]], threshold=thr, min_component=3).summary()


# ----------------------------------------------------------------------------- noise norm


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
    )
    return unet, DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def latents_and_text(cxr):
    """Latents from real CXRs (4 channels of a 16x16 thumbnail, in [-1, 1]) and fixed text states."""
    z = torch.nn.functional.interpolate(cxr[0][:6], size=(16, 16), mode="area")
    z = torch.cat([z, z.mean(1, keepdim=True)], 1) * 2 - 1
    g = torch.Generator().manual_seed(1)
    return z, torch.randn(6, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)


def test_noise_norm_zero_when_caption_is_empty(tiny_unet, latents_and_text):
    unet, sched = tiny_unet
    z, _, uncond = latents_and_text
    out = noise_norm(unet, z, uncond.expand(6, -1, -1), uncond, sched, seed=0)
    np.testing.assert_array_equal(out["per_sample"], 0.0)


def test_noise_norm_seeded_and_batch_size_invariant(tiny_unet, latents_and_text):
    unet, sched = tiny_unet
    z, cond, uncond = latents_and_text
    unet.train()
    a = noise_norm(unet, z, cond, uncond, sched, seed=3, batch_size=4)
    b = noise_norm(unet, z, cond, uncond, sched, seed=3, batch_size=2)
    assert unet.training  # mode restored
    np.testing.assert_allclose(a["per_sample"], b["per_sample"], rtol=1e-5)
    np.testing.assert_array_equal(a["timesteps"], b["timesteps"])
    assert (a["per_sample"] > 0).all() and a["per_sample"].shape == (6,)
    assert a["mean"] == pytest.approx(a["per_sample"].mean())
    assert a["max"] == pytest.approx(np.mean([a["per_sample"][:4].max(), a["per_sample"][4:].max()]))
    assert a["max"] >= a["mean"]
    c = noise_norm(unet, z, cond, uncond, sched, seed=4, batch_size=4)
    assert not np.allclose(c["per_sample"], a["per_sample"])
    assert all(p.grad is None for p in unet.parameters())


def test_noise_norm_accepts_encoder_attention_mask(tiny_unet, latents_and_text):
    unet, sched = tiny_unet
    z, cond, uncond = latents_and_text
    base = noise_norm(unet, z, cond, uncond, sched, seed=0)
    ones = noise_norm(unet, z, cond, uncond, sched, seed=0, cond_mask=torch.ones(6, 5, dtype=torch.long))
    np.testing.assert_allclose(ones["per_sample"], base["per_sample"], rtol=1e-4)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[:, 3:] = 0  # padding tokens masked out changes the conditioning
    masked = noise_norm(unet, z, cond, uncond, sched, seed=0, cond_mask=mask)
    assert not np.allclose(masked["per_sample"], base["per_sample"])
    with pytest.raises(ValueError, match="cond_mask"):
        noise_norm(unet, z, cond, uncond, sched, seed=0, cond_mask=torch.ones(6, 4))
