"""Memorization metrics: nearest-neighbour similarity to the training set (FAISS), AMD, noise norm.

- `ReferenceIndex`: a FAISS inner-product index over (optionally centred) L2-normalised training
  embeddings, built once per dataset and reused by every trial. Search returns cosine similarities.
- `calibrate_threshold` / `nn_scores`: Somepalli et al.'s score (flagged rate, mean and 95th
  percentile of each generation's max similarity to the training set), with a threshold either
  fixed or calibrated on held-out real images.
- `amd`: MiFID's average minimum cosine distance.
- `noise_norm`: Wen et al.'s text-conditional noise-prediction magnitude, as the reference codes it
  (reference.md §3.4), without its CFG-dropout and autograd bugs.
- `copy_detection_rates`: the known-answer check of an embedder + index + threshold: are exact and
  mildly augmented copies of training images flagged, and held-out real images not?

Formulas, directions and weaknesses: docs/metrics.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

LOG = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_DTYPES = ("float32", "float16")
_FORMAT_VERSION = 1
_CHUNK = 65536  # rows transformed/added per step, so building never copies the whole set twice


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, the one place embeddings are normalised (before add and search).

    Args:
        x: (n, d) float.

    Returns:
        (n, d) float32 with unit rows (zero rows stay zero).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalise expects (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def _as_feats(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty (n, d) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"`{name}` has dim {x.shape[1]}, the index expects {dim}")
    for i in range(0, len(x), _CHUNK):  # chunked: a full-size boolean copy of 1M x d is wasteful
        if not np.isfinite(x[i : i + _CHUNK]).all():
            raise ValueError(f"`{name}` contains NaN or inf (rows {i}..{min(i + _CHUNK, len(x)) - 1})")
    return x


# ----------------------------------------------------------------------------- reference index


@dataclass(frozen=True)
class IndexSettings:
    """How a `ReferenceIndex` is built and searched (all of it is saved with the index).

    kind: ``flat`` (exact), ``ivf`` (inverted lists, ``nlist`` cells, ``nprobe`` searched) or
        ``hnsw`` (graph, ``hnsw_m`` links, ``ef_construction``/``ef_search`` beam widths).
    center: subtract the reference mean before normalising (copy-detection practice; essential when
        all images look alike, e.g. chest X-rays).
    dtype: ``float16`` stores vectors as a fp16 scalar quantizer (half the memory, tiny recall cost).
    pca_dim: project the normalised vectors on their top ``pca_dim`` principal directions
        (uncentred second moment) and renormalise: cosine is then approximate.
    """

    kind: str = "flat"
    center: bool = True
    dtype: str = "float32"
    pca_dim: int | None = None
    nlist: int | None = None  # None: sqrt(n), at least 1 and at most n // 39
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int = 100_000  # PCA training sample; IVF k-means uses at most 64 * nlist of it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index `kind` must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.dtype not in INDEX_DTYPES:
            raise ValueError(f"index `dtype` must be one of {INDEX_DTYPES}, got {self.dtype!r}")
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"index `pca_dim` must be >= 1 or None, got {self.pca_dim}")
        for k in ("nprobe", "hnsw_m", "ef_construction", "ef_search", "train_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"index `{k}` must be >= 1, got {getattr(self, k)}")


class ReferenceIndex:
    """FAISS inner-product index over centred, L2-normalised training embeddings.

    Vectors go through `transform` (centre -> `l2_normalise` -> optional PCA -> `l2_normalise`)
    before both add and search, so search returns cosine similarities in that space.
    """

    def __init__(self, index: faiss.Index, settings: IndexSettings, dim_in: int, mean: np.ndarray | None, pca: np.ndarray | None) -> None:
        self.index = index
        self.settings = settings
        self.dim_in = dim_in
        self.mean = mean  # (dim_in,) float32 or None
        self.pca = pca  # (dim_in, pca_dim) float32 or None
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the vectors stored in FAISS."""
        return int(self.index.d)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, dim_in) raw embeddings -> (n, dim) float32 unit vectors as stored in the index."""
        x = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            x = x - self.mean
        x = l2_normalise(x)
        if self.pca is not None:
            x = l2_normalise(x @ self.pca)
        return x

    @classmethod
    def build(
        cls,
        feats: np.ndarray,
        *,
        kind: str = "flat",
        center: bool = True,
        dtype: str = "float32",
        pca_dim: int | None = None,
        **options,
    ) -> ReferenceIndex:
        """Build the index over training embeddings.

        Args:
            feats: (n, d) float32 raw (unnormalised) training embeddings.
            kind, center, dtype, pca_dim, **options: see `IndexSettings`.
        """
        s = IndexSettings(kind=kind, center=center, dtype=dtype, pca_dim=pca_dim, **options)
        feats = _as_feats(feats, "feats")
        n, d = feats.shape
        rng = np.random.default_rng(s.seed)
        mean = feats.mean(axis=0, dtype=np.float64).astype(np.float32) if s.center else None
        ref = cls(faiss.IndexFlatIP(d), s, d, mean, None)  # placeholder index until trained
        sample = rng.choice(n, size=min(n, s.train_size), replace=False)  # random order
        if s.pca_dim is not None:
            if s.pca_dim > d:
                raise ValueError(f"pca_dim={s.pca_dim} exceeds the embedding dim {d}")
            x = ref.transform(feats[np.sort(sample)]).astype(np.float64)
            # eigh of the uncentred second moment: its top eigenvectors best preserve inner products
            _, vecs = np.linalg.eigh(x.T @ x / len(x))
            ref.pca = np.ascontiguousarray(vecs[:, ::-1][:, : s.pca_dim], dtype=np.float32)
        dim = s.pca_dim or d
        ref.index = _new_faiss_index(s, dim, n)
        if not ref.index.is_trained:  # IVF: 64 points per centroid is plenty for k-means
            ivf = faiss.try_extract_index_ivf(ref.index)
            km_rows = np.sort(sample[: 64 * ivf.nlist] if ivf is not None else sample)
            ref.index.train(ref.transform(feats[km_rows]))
        for i in range(0, n, _CHUNK):
            ref.index.add(ref.transform(feats[i : i + _CHUNK]))
        ref._apply_search_params()
        LOG.info("built %s reference index: n=%d, dim %d -> %d, center=%s, dtype=%s", s.kind, n, d, dim, s.center, s.dtype)
        return ref

    def _apply_search_params(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self.settings.nprobe
        elif hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = self.settings.ef_search

    def search(self, queries: np.ndarray, k: int = 1, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """k nearest training vectors of each query.

        Args:
            queries: (m, dim_in) float32 raw embeddings (transformed here like the training set).
            k: neighbours per query, 1 <= k <= ntotal.
            batch_size: queries per FAISS call; bounds the transformed copy and result buffers.

        Returns:
            sims: (m, k) float32 cosine similarities, descending; idx: (m, k) int64 training rows.
        """
        q = _as_feats(queries, "queries", self.dim_in)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}] (the index size), got {k}")
        sims = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for i in range(0, len(q), batch_size):
            sims[i : i + batch_size], idx[i : i + batch_size] = self.index.search(self.transform(q[i : i + batch_size]), k)
        if (idx < 0).any():  # IVF probing too few cells can come back short of k results
            LOG.warning("%d of %d queries got fewer than k=%d neighbours (idx -1, sim -inf); raise nprobe",
                        int((idx < 0).any(axis=1).sum()), len(q), k)
            sims[idx < 0] = -np.inf
        return sims, idx

    def save(self, directory: Path) -> None:
        """Write ``index.faiss``, ``arrays.npz`` (mean, PCA) and ``meta.json`` atomically (meta last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".index.faiss.tmp{os.getpid()}"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, directory / "index.faiss")
        buf = io.BytesIO()
        arrays = {k: v for k, v in (("mean", self.mean), ("pca", self.pca)) if v is not None}
        np.savez(buf, **arrays)
        _atomic_write(directory / "arrays.npz", buf.getvalue())
        meta = {"format_version": _FORMAT_VERSION, "dim_in": self.dim_in, "ntotal": self.ntotal, "settings": asdict(self.settings)}
        _atomic_write(directory / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, directory: Path) -> ReferenceIndex:
        """Load an index written by `save`; checks that its parts agree."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"`{meta_path}` is missing: not a saved ReferenceIndex (or an interrupted save)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"`{meta_path}`: format_version {meta.get('format_version')} != {_FORMAT_VERSION}")
        settings = IndexSettings(**meta["settings"])
        index = faiss.read_index(str(directory / "index.faiss"))
        with np.load(directory / "arrays.npz") as z:
            mean = z["mean"] if "mean" in z else None
            pca = z["pca"] if "pca" in z else None
        if index.ntotal != meta["ntotal"]:
            raise ValueError(f"`{directory / 'index.faiss'}` holds {index.ntotal} vectors, meta.json says {meta['ntotal']}")
        if (mean is not None) != settings.center or (pca is not None) != (settings.pca_dim is not None):
            raise ValueError(f"`{directory / 'arrays.npz'}` does not match the settings in meta.json")
        return cls(index, settings, int(meta["dim_in"]), mean, pca)


def _new_faiss_index(s: IndexSettings, dim: int, n: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if s.kind == "flat":
        return faiss.IndexFlatIP(dim) if s.dtype == "float32" else faiss.IndexScalarQuantizer(dim, fp16, ip)
    if s.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, s.hnsw_m, ip) if s.dtype == "float32" else faiss.IndexHNSWSQ(dim, fp16, s.hnsw_m, ip)
        index.hnsw.efConstruction = s.ef_construction
        return index
    nlist = s.nlist or int(math.sqrt(n))
    nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 training points per centroid
    quantizer = faiss.IndexFlatIP(dim)
    if s.dtype == "float32":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, fp16, ip)
    index.cp.seed = s.seed  # k-means initialisation
    return index  # faiss' Python wrapper keeps `quantizer` alive as a referenced object


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def brute_force_search(ref_feats: np.ndarray, queries: np.ndarray, k: int = 1, *, center: bool = True, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact numpy cosine k-NN with the same centring and normalisation as `ReferenceIndex` (flat).

    The ground truth that FAISS is checked against. Blocks over the reference set so memory stays
    ``O(m * (block + k))``.

    Returns:
        sims (m, k) float32 descending, idx (m, k) int64.
    """
    ref_feats = _as_feats(ref_feats, "ref_feats")
    q = _as_feats(queries, "queries", ref_feats.shape[1])
    mean = ref_feats.mean(axis=0, dtype=np.float64).astype(np.float32) if center else 0.0
    qn = l2_normalise(q - mean)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for j in range(0, len(ref_feats), block):
        s = qn @ l2_normalise(ref_feats[j : j + block] - mean).T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(j, j + s.shape[1]), s.shape)], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_s.astype(np.float32), best_i.astype(np.int64)


# ----------------------------------------------------------------------------- scores


def calibrate_threshold(heldout_max_sims: np.ndarray, quantile: float) -> float:
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
    if k > s.size:
        LOG.warning(
            "calibrate_threshold: %d held-out images are too few for quantile %.3f (need >= %d); using their max",
            s.size, quantile, math.ceil(quantile / (1 - quantile)),
        )
        k = s.size
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
    g = _as_feats(gen_feats, "gen_feats")
    t = _as_feats(train_feats, "train_feats", g.shape[1])
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
    """Text-conditional noise-prediction magnitude (Wen et al. ICLR'24, as coded by the reference, §3.4).

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


# ----------------------------------------------------------------------------- known-answer validation

Augmentation = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _crop(x: torch.Tensor, rng: np.random.Generator, keep: tuple[float, float]) -> torch.Tensor:
    """Random crop keeping a share ``U(keep)`` of each side at a random position, resized back."""
    _, h, w = x.shape
    f = rng.uniform(*keep)
    ch, cw = max(1, round(h * f)), max(1, round(w * f))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    c = x[None, :, y0 : y0 + ch, x0 : x0 + cw]
    return torch.nn.functional.interpolate(c, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def _brightness(x: torch.Tensor, rng: np.random.Generator, factor: tuple[float, float]) -> torch.Tensor:
    return (x * rng.uniform(*factor)).clamp(0, 1)


def _noise(x: torch.Tensor, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    return (x + torch.from_numpy(rng.normal(0.0, sigma, x.shape).astype(np.float32))).clamp(0, 1)


def _jpeg(x: torch.Tensor, rng: np.random.Generator, quality: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


AUGMENTATION_LEVELS = {
    # name -> (function, parameters); documented in docs/metrics.md
    "mild": {
        "exact": (lambda x, rng: x.clone(), "identity"),
        "crop": (lambda x, rng: _crop(x, rng, (0.90, 0.95)), "keep 90-95% of each side, resized back"),
        "hflip": (lambda x, rng: x.flip(-1), "horizontal flip"),
        "brightness": (lambda x, rng: _brightness(x, rng, (0.8, 1.2)), "x U(0.8, 1.2)"),
        "noise": (lambda x, rng: _noise(x, rng, 0.01), "Gaussian sigma 0.01"),
        "jpeg": (lambda x, rng: _jpeg(x, rng, (50, 75)), "JPEG quality 50-75"),
    },
    "moderate": {
        "crop": (lambda x, rng: _crop(x, rng, (0.80, 0.90)), "keep 80-90% of each side, resized back"),
        "brightness": (lambda x, rng: _brightness(x, rng, (0.6, 1.4)), "x U(0.6, 1.4)"),
        "noise": (lambda x, rng: _noise(x, rng, 0.03), "Gaussian sigma 0.03"),
        "jpeg": (lambda x, rng: _jpeg(x, rng, (20, 40)), "JPEG quality 20-40"),
        "combo": (
            lambda x, rng: _jpeg(_noise(_brightness(_crop(x, rng, (0.85, 0.95)), rng, (0.8, 1.2)), rng, 0.02), rng, (50, 75)),
            "crop 85-95% + brightness 0.8-1.2 + noise 0.02 + JPEG 50-75",
        ),
    },
}


def augmentations(level: str = "mild") -> dict[str, Augmentation]:
    """Copy edits of one strength, each ``(3, H, W) in [0, 1], rng -> (3, H, W) in [0, 1]``.

    ``mild`` (the >= 90% detection requirement): exact; crop keeping 90-95% of each side; hflip;
    brightness x U(0.8, 1.2); Gaussian noise sigma 0.01; JPEG quality 50-75. ``moderate``: crop 80-90%,
    brightness x U(0.6, 1.4), noise sigma 0.03, JPEG 20-40, and a combination. See
    ``AUGMENTATION_LEVELS`` for the parameters.
    """
    if level not in AUGMENTATION_LEVELS:
        raise ValueError(f"unknown augmentation level {level!r}; known: {list(AUGMENTATION_LEVELS)}")
    return {name: fn for name, (fn, _) in AUGMENTATION_LEVELS[level].items()}


@dataclass
class DetectionReport:
    """Result of `copy_detection_rates` (rates are shares of images flagged)."""

    threshold: float
    quantile: float | None
    n_train: int
    n_calib: int
    n_check: int
    copy_rates: dict[str, float]  # per augmentation: flagged share of augmented training copies
    copy_mean_sim: dict[str, float]
    heldout_check_rate: float  # flagged share of held-out real images not used for calibration
    heldout_check_mean_sim: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def copy_detection_rates(
    train_feats: np.ndarray,
    copy_feats: Mapping[str, np.ndarray],
    calib_feats: np.ndarray,
    check_feats: np.ndarray | None = None,
    *,
    quantile: float | None = 0.95,
    threshold: float | None = None,
    center: bool = True,
) -> DetectionReport:
    """Known-answer check of an embedder + reference index + threshold.

    Builds a flat index over ``train_feats``; the threshold is ``threshold`` if given, else calibrated
    on ``calib_feats`` (held-out real images) at ``quantile``. Reports, per augmentation, the share of
    ``copy_feats[name]`` (embeddings of augmented training images) flagged, and the share of
    ``check_feats`` (other held-out real images, not used to calibrate) flagged, which should stay
    <= 1 - quantile on average.

    Args:
        train_feats: (n, d); copy_feats: name -> (r, d); calib_feats: (c, d); check_feats: (k, d) or None.
    """
    ref = ReferenceIndex.build(train_feats, kind="flat", center=center)
    if threshold is None:
        if quantile is None:
            raise ValueError("copy_detection_rates: give `threshold` or `quantile`")
        threshold = calibrate_threshold(ref.search(calib_feats)[0][:, 0], quantile)
    rates, sims = {}, {}
    for name, f in copy_feats.items():
        s = ref.search(f)[0][:, 0]
        rates[name] = float((s > threshold).mean())
        sims[name] = float(s.mean())
    chk = ref.search(check_feats)[0][:, 0] if check_feats is not None else np.array([np.nan])
    return DetectionReport(
        threshold=float(threshold),
        quantile=quantile,
        n_train=len(train_feats),
        n_calib=len(calib_feats),
        n_check=0 if check_feats is None else len(check_feats),
        copy_rates=rates,
        copy_mean_sim=sims,
        heldout_check_rate=float((chk > threshold).mean()) if check_feats is not None else float("nan"),
        heldout_check_mean_sim=float(chk.mean()),
    )
